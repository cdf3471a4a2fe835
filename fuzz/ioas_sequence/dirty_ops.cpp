// The dirty-log operation: switch tracking, read (and clear) the log. The
// model predicts every errno and every bit: the pages written since the last
// switch or read (IoasModel::dirty_pages) plus every page an access of the
// IOAS holds pinned.
#include "ioas_sequence/generators.hpp"
#include "ioas_sequence/operations.hpp"
#include "ioas_sequence/oracle.hpp"

namespace iomm::fuzz::ioas_sequence {

namespace {

constexpr uint64_t kMaxBitmapWords = 4096;  // 256 Ki pages, 1 GiB of IOVA

void set_bit(std::vector<uint64_t>& bits, uint64_t first_page, uint64_t npages, uint64_t page) {
  if (page < first_page || page - first_page >= npages) return;
  const uint64_t i = page - first_page;
  if ((i >> 6) < bits.size()) bits[i >> 6] |= uint64_t{1} << (i & 63);
}

// The bitmap read_and_clear_dirty/peek_dirty must return for npages pages
// from first_page, in a bitmap of `words` words.
std::vector<uint64_t> expected_bitmap(const IoasModel& m, uint64_t first_page, uint64_t npages,
                                      size_t words) {
  std::vector<uint64_t> bits(words, 0);
  for (auto it = m.dirty_pages.lower_bound(first_page);
       it != m.dirty_pages.end() && *it - first_page < npages; ++it) {
    set_bit(bits, first_page, npages, *it);
  }
  for (const AccessModel* acc : w->accesses_of(&m)) {
    for (const auto& [iova, len] : acc->pins) {
      const uint64_t p0 = std::max(iova >> kPageShift, first_page);
      const uint64_t p1 = (iova + len - 1) >> kPageShift;
      for (uint64_t p = p0; p <= p1 && p - first_page < npages; ++p) {
        set_bit(bits, first_page, npages, p);
      }
    }
    for (const auto& [page, count] : acc->page_pins) {
      set_bit(bits, first_page, npages, page >> kPageShift);
    }
  }
  return bits;
}

}  // namespace

void op_dirty(Reader& in) {
  IoasModel* m = w->ioas[in.u8() & 1].get();
  const uint8_t b = in.u8();
  const int action = b % 4;  // 0 on, 1 off, 2 read and clear, 3 peek
  if (action < 2) {
    const bool on = action == 0;
    m->ioas->set_dirty_tracking(on);
    g_last_code = 0;
    FUZZ_CHECK(m->ioas->dirty_tracking() == on, "dirty_tracking() is %d after set(%d)",
               m->ioas->dirty_tracking(), on);
    m->dirty_tracking = on;
    m->dirty_pages.clear();  // switching either way clears the log
    return;
  }
  const bool clear = action == 2;
  uint64_t iova = pick_iova_rel(in, m);
  if ((b & 4) != 0) iova &= ~(kPageSize - 1);
  uint64_t len = pick_len_rel(in, m, iova);
  if ((b & 8) != 0) len = (len + kPageSize - 1) & ~(kPageSize - 1);
  w->probe_iova = iova;
  const uint64_t npages = len >> kPageShift;
  const uint64_t need = (npages + 63) / 64;
  uint64_t words = std::min(need, kMaxBitmapWords);
  if ((b & 16) != 0 && words > 0) --words;  // one word short
  int want = 0;
  if (!m->dirty_tracking || len == 0 || !is_aligned(iova, kPageSize) ||
      !is_aligned(len, kPageSize)) {
    want = EINVAL;
  } else if (!range_of(iova, len)) {
    want = EOVERFLOW;
  } else if (words < need) {
    want = EINVAL;
  }
  std::vector<uint64_t> bitmap(words, 0xa5a5a5a5a5a5a5a5ULL);
  const std::vector<uint64_t> before = bitmap;
  const Status& s = note(clear ? m->ioas->read_and_clear_dirty(iova, len, bitmap)
                               : m->ioas->peek_dirty(iova, len, bitmap));
  FUZZ_CHECK(s.code() == want, "%s(%#lx, %#lx, %lu words) gave %s, model %s",
             clear ? "read_and_clear_dirty" : "peek_dirty", iova, len, words, errno_name(s.code()),
             errno_name(want));
  if (!s) {
    FUZZ_CHECK(bitmap == before, "a failed dirty read wrote the bitmap");
    return;
  }
  const uint64_t first_page = iova >> kPageShift;
  const std::vector<uint64_t> expect = expected_bitmap(*m, first_page, npages, words);
  for (size_t i = 0; i < words; ++i) {
    FUZZ_CHECK(bitmap[i] == expect[i],
               "dirty bitmap word %zu (pages from %#lx) = %#lx, model %#lx (written or pinned)", i,
               (first_page + i * 64) << kPageShift, bitmap[i], expect[i]);
  }
  if (clear) {
    m->dirty_pages.erase(m->dirty_pages.lower_bound(first_page),
                         m->dirty_pages.lower_bound(first_page + npages));
  }
}

}  // namespace iomm::fuzz::ioas_sequence
