# Runs a command and checks its exit code and its output together (ctest's
# PASS_REGULAR_EXPRESSION alone would ignore the exit code).
#   cmake -DCOMMAND="prog;arg;..." -DEXPECT_RC=0 -DEXPECT="regex;regex..." -P run_and_match.cmake
# Every regex must match stdout; stderr is shown on failure.
if(NOT DEFINED EXPECT_RC)
  set(EXPECT_RC 0)
endif()
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}")
set(problems "")
if(NOT rc STREQUAL EXPECT_RC)
  string(APPEND problems "exit code ${rc}, expected ${EXPECT_RC}\n")
endif()
foreach(regex IN LISTS EXPECT)
  if(NOT out MATCHES "${regex}")
    string(APPEND problems "output does not match: ${regex}\n")
  endif()
endforeach()
if(problems)
  message(FATAL_ERROR "${problems}stderr:\n${err}")
endif()
