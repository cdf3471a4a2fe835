// Argument generators of the IOAS sequence fuzzer: turn input bytes into
// IOVAs, lengths and protections, mostly from small tables of interesting
// values and values relative to the model's mappings.
#pragma once

#include "ioas_sequence/model.hpp"

namespace iomm::fuzz::ioas_sequence {

uint64_t pick_len(Reader& in);

// An IOVA relative to an existing mapping (0xc0..0xfe), or a plain pick.
uint64_t pick_iova_rel(Reader& in, const IoasModel* m);

// A length relative to the mappings at iova (0xe0..0xfe: to the end of the
// k-th mapping from there), or a plain pick.
uint64_t pick_len_rel(Reader& in, const IoasModel* m, uint64_t iova);

uint32_t pick_prot(uint8_t b);

}  // namespace iomm::fuzz::ioas_sequence
