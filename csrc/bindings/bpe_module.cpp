// gpt2fast._bpe: the Python face of the C++ tokenizer core. Encoding runs with the GIL released;
// batches run on a pool of native threads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <atomic>
#include <exception>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include <unistd.h>
#include <vector>

#include "../bpe/encoder.h"
#include "../bpe/pretokenize.h"
#include "../bpe/trainer.h"
#include "../bpe/vocab_io.h"

namespace py = pybind11;
using namespace gpt2fast::bpe;

namespace {

// UTF-8 view of a str, valid while the str lives. A lone surrogate has no UTF-8 form: say where it is.
std::string_view utf8_of(const py::handle& obj, const char* what) {
  if (!PyUnicode_Check(obj.ptr()))
    throw py::type_error(std::string(what) + " must be str, not " + Py_TYPE(obj.ptr())->tp_name);
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (data != nullptr) return std::string_view(data, static_cast<std::size_t>(size));
  PyErr_Clear();
  const Py_ssize_t n = PyUnicode_GetLength(obj.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Py_UCS4 ch = PyUnicode_ReadChar(obj.ptr(), i);
    if (ch >= 0xD800 && ch < 0xE000) {
      char buf[16];
      std::snprintf(buf, sizeof buf, "U+%04X", static_cast<unsigned>(ch));
      throw py::value_error(std::string(what) + " contains a lone surrogate " + buf + " at index " +
                            std::to_string(i) +
                            ", which is not valid Unicode and cannot be encoded; remove it, or replace it "
                            "first with text.encode('utf-8', 'replace').decode('utf-8')");
    }
  }
  throw py::value_error(std::string(what) + " cannot be encoded as UTF-8");
}

// One Python int per vocabulary id, made once: building a result list is then a reference-count bump per
// token instead of an allocation, which matters when a call returns millions of ids.
class IdObjects {
 public:
  explicit IdObjects(std::size_t n) {
    objects_.reserve(n);
    for (std::size_t i = 0; i < n; ++i) objects_.push_back(py::int_(i));
  }
  py::list to_list(const std::vector<Rank>& ids) const { return to_list(ids.data(), ids.size()); }
  py::list to_list(const Rank* ids, std::size_t n) const {
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
    if (list == nullptr) throw py::error_already_set();
    for (std::size_t i = 0; i < n; ++i) {
      PyObject* v = objects_[ids[i]].ptr();
      Py_INCREF(v);
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
    }
    return py::reinterpret_steal<py::list>(list);
  }

 private:
  std::vector<py::object> objects_;
};

// A thread's reusable output buffer: its pages stay mapped from call to call. Cleared at the first use in
// each new batch; handed back to the allocator when one huge text made it large.
struct OutputBuffer {
  std::vector<Rank> ids;
  std::uint64_t batch = 0;

  static OutputBuffer& for_batch(std::uint64_t batch_id) {
    thread_local OutputBuffer buf;
    if (buf.batch != batch_id) {
      buf.batch = batch_id;
      buf.ids.clear();
    }
    return buf;
  }
  void release_if_large() {
    constexpr std::size_t kKeep = std::size_t{1} << 21;  // ids (8 MiB)
    if (ids.capacity() > kKeep) std::vector<Rank>().swap(ids);
  }
};

std::uint64_t next_batch_id() {
  static std::atomic<std::uint64_t> counter{0};
  return ++counter;
}

// Token ids from any iterable of ints (list, tuple, numpy array, range...). An id too large for a C++ integer is
// out of every vocabulary: it is reported as Python wrote it, with the vocabulary's range.
std::vector<long long> ids_of(const py::handle& obj, std::size_t n_vocab) {
  std::vector<long long> ids;
  PyObject* seq = PySequence_Fast(obj.ptr(), "token ids must be an iterable of ints");
  if (seq == nullptr) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  ids.resize(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    PyObject* index = PyNumber_Index(item);
    if (index == nullptr) {
      Py_DECREF(seq);
      PyErr_Clear();
      throw py::type_error("token id at position " + std::to_string(i) + " is " +
                           std::string(py::repr(item)) + ", not an int");
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (overflow != 0) {
      const std::string written = py::str(py::handle(index));
      Py_DECREF(index);
      Py_DECREF(seq);
      throw InputError("token id " + written + " at position " + std::to_string(i) +
                       " is not in the vocabulary (valid ids: 0.." + std::to_string(n_vocab - 1) +
                       "); were these ids made by another tokenizer?");
    }
    Py_DECREF(index);
    ids[static_cast<std::size_t>(i)] = v;
  }
  Py_DECREF(seq);
  return ids;
}

unsigned resolve_threads(py::object num_threads, std::size_t work_items) {
  unsigned n = std::max(1u, std::thread::hardware_concurrency());
  if (!num_threads.is_none()) {
    // An int (not a bool, not a float): anything else is a TypeError that says what was given.
    if (!PyLong_Check(num_threads.ptr()) || PyBool_Check(num_threads.ptr()))
      throw py::type_error("num_threads must be an int of at least 1 (or None for all cores), got " +
                           std::string(py::repr(num_threads)));
    int overflow = 0;
    const long long requested = PyLong_AsLongLongAndOverflow(num_threads.ptr(), &overflow);
    if (overflow < 0 || (overflow == 0 && requested < 1))
      throw py::value_error("num_threads must be at least 1 (or None for all cores), got " +
                            std::string(py::str(num_threads)));
    // More threads than this only costs memory: asking for 2**70 means "as many as useful".
    n = overflow > 0 ? 1024u : static_cast<unsigned>(std::min<long long>(requested, 1024));
  }
  return static_cast<unsigned>(std::max<std::size_t>(1, std::min<std::size_t>(n, work_items)));
}

// Worker threads that outlive a call, so their per-thread piece caches stay warm from batch to batch.
class WorkerPool {
 public:
  // Call with the GIL held (it serialises the first use). Never destroyed: workers may outlive interpreter
  // teardown. After fork() the child has none of the parent's threads, so it starts a pool of its own
  // (the old one is leaked: its std::thread objects name threads that do not exist there).
  static WorkerPool& instance() {
    static WorkerPool* pool = nullptr;
    static pid_t owner = 0;
    if (pool == nullptr || owner != getpid()) {
      pool = new WorkerPool();
      owner = getpid();
    }
    return *pool;
  }

  // Held by a caller from before run() until it has read its results out of the workers' buffers: the
  // next batch reuses those buffers.
  std::mutex& batch_mutex() { return batch_mutex_; }

  // Runs fn(i) for i in [0, n_items) on n_threads threads (the caller's among them); rethrows the first
  // error. The caller must hold batch_mutex().
  void run(std::size_t n_items, unsigned n_threads, const std::function<void(std::size_t)>& fn) {
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto drain = [&] {
      try {
        for (std::size_t i; !failed && (i = next.fetch_add(1)) < n_items;) fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!failed.exchange(true)) error = std::current_exception();
      }
    };
    const unsigned helpers = n_threads - 1;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (workers_.size() < helpers) workers_.emplace_back([this] { loop(); });
      task_ = drain;
      pending_ = helpers;
      active_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return active_ == 0; });
    task_ = nullptr;
    if (error) std::rethrow_exception(error);
  }

 private:
  void loop() {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [&] { return generation_ != seen && pending_ > 0; });
      seen = generation_;
      --pending_;
      const std::function<void()> task = task_;
      lock.unlock();
      task();
      lock.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::mutex batch_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  std::function<void()> task_;
  unsigned pending_ = 0, active_ = 0;
  std::uint64_t generation_ = 0;
};

class CoreBPE {
 public:
  // Parsing and table building run without the GIL; the Python ints are made with it.
  static std::unique_ptr<CoreBPE> build(Vocabulary v) {
    std::unique_ptr<Encoder> encoder;
    {
      py::gil_scoped_release nogil;
      encoder = std::make_unique<Encoder>(std::move(v.tokens), std::move(v.specials));
    }
    return std::unique_ptr<CoreBPE>(new CoreBPE(std::move(encoder), std::move(v.merges)));
  }

  py::list encode_ordinary(const py::object& text) const {
    const std::string_view s = utf8_of(text, "text");
    OutputBuffer& buf = OutputBuffer::for_batch(next_batch_id());
    {
      py::gil_scoped_release nogil;
      encoder_->encode_ordinary(s, buf.ids);
    }
    py::list out = ids_.to_list(buf.ids.data(), buf.ids.size());
    buf.release_if_large();
    return out;
  }

  py::list encode(const py::object& text, const std::vector<std::size_t>& allowed) const {
    check_special_indices(allowed);
    const std::string_view s = utf8_of(text, "text");
    OutputBuffer& buf = OutputBuffer::for_batch(next_batch_id());
    {
      py::gil_scoped_release nogil;
      encoder_->encode_with_specials(s, allowed, buf.ids);
    }
    py::list out = ids_.to_list(buf.ids.data(), buf.ids.size());
    buf.release_if_large();
    return out;
  }

  py::list encode_batch(const py::list& texts, const std::vector<std::size_t>& allowed, bool ordinary,
                        py::object num_threads) const {
    check_special_indices(allowed);
    std::vector<std::string_view> views(texts.size());
    for (std::size_t i = 0; i < views.size(); ++i)
      views[i] = utf8_of(texts[i], ("texts[" + std::to_string(i) + "]").c_str());
    // Each thread appends its texts' ids to its own long-lived buffer: fresh per-text vectors would
    // page-fault on first touch, and page faults of threads in one process queue on the same lock.
    struct Span {
      OutputBuffer* buffer;
      std::size_t offset, length;
    };
    std::vector<Span> spans(views.size());
    const unsigned threads = resolve_threads(num_threads, views.size());
    const std::uint64_t batch = next_batch_id();
    WorkerPool& pool = WorkerPool::instance();
    std::unique_lock<std::mutex> batch_lock(pool.batch_mutex(), std::defer_lock);
    {
      py::gil_scoped_release nogil;  // never wait for another batch while holding the GIL
      batch_lock.lock();
      pool.run(views.size(), threads, [&](std::size_t i) {
        OutputBuffer& buf = OutputBuffer::for_batch(batch);
        const std::size_t before = buf.ids.size();
        if (ordinary) encoder_->encode_ordinary(views[i], buf.ids);
        else encoder_->encode_with_specials(views[i], allowed, buf.ids);
        spans[i] = {&buf, before, buf.ids.size() - before};
      });
    }
    py::list out(views.size());
    for (std::size_t i = 0; i < views.size(); ++i)
      out[i] = ids_.to_list(spans[i].buffer->ids.data() + spans[i].offset, spans[i].length);
    for (const Span& sp : spans) sp.buffer->release_if_large();
    return out;
  }

  // First occurrence of any of the given specials: (index of the special, character offset), or None.
  py::object find_special(const py::object& text, const std::vector<std::size_t>& which) const {
    check_special_indices(which);
    const std::string_view s = utf8_of(text, "text");
    std::size_t best = std::string_view::npos, best_k = 0;
    for (std::size_t k : which) {
      const std::size_t f = s.find(encoder_->specials()[k].text);
      if (f < best) {
        best = f;
        best_k = k;
      }
    }
    if (best == std::string_view::npos) return py::none();
    return py::make_tuple(best_k, utf8_length(s.data(), best));
  }

  py::bytes decode_bytes(const py::handle& ids_obj) const {
    const std::vector<long long> ids = ids_of(ids_obj, encoder_->n_vocab());
    std::string out;
    {
      py::gil_scoped_release nogil;
      encoder_->decode_bytes(ids.data(), ids.size(), out);
    }
    return py::bytes(out);
  }

  py::bytes token_bytes(long long id) const {
    std::string out;
    encoder_->decode_bytes(&id, 1, out);
    return py::bytes(out);
  }

  py::list merge_piece(const py::bytes& piece, bool heap) const {
    const std::string_view s = piece;
    if (s.empty()) return py::list();
    std::vector<Rank> out;
    if (heap) encoder_->merge_long(s, out);
    else encoder_->encode_piece_uncached(s, out);
    return ids_.to_list(out);
  }

  py::list merges() const {
    if (merges_.empty() && encoder_->n_ordinary() > 256) merges_ = derive_merges(*encoder_);
    py::list out;
    for (const auto& [a, b] : merges_) out.append(py::make_tuple(a, b));
    return out;
  }

  py::list specials() const {
    py::list out;
    for (const SpecialToken& sp : encoder_->specials()) out.append(py::make_tuple(py::str(sp.text), sp.id));
    return out;
  }

  py::list ordinary_tokens() const {
    py::list out;
    for (Rank r = 0; r < encoder_->n_ordinary(); ++r) out.append(py::bytes(std::string(encoder_->token_bytes(r))));
    return out;
  }

  std::size_t n_vocab() const { return encoder_->n_vocab(); }
  std::size_t n_ordinary() const { return encoder_->n_ordinary(); }
  std::size_t memory_bytes() const { return encoder_->memory_bytes(); }
  py::object rank_of(const py::bytes& b) const {
    const Rank r = encoder_->rank_of(std::string_view(b));
    if (r == kNoRank) return py::none();
    return py::int_(r);
  }

 private:
  void check_special_indices(const std::vector<std::size_t>& which) const {
    for (std::size_t k : which)
      if (k >= encoder_->specials().size()) throw py::index_error("special token index out of range");
  }

  CoreBPE(std::unique_ptr<Encoder> encoder, std::vector<std::pair<Rank, Rank>> merges)
      : merges_(std::move(merges)), encoder_(std::move(encoder)), ids_(encoder_->n_vocab()) {}

  mutable std::vector<std::pair<Rank, Rank>> merges_;
  std::unique_ptr<Encoder> encoder_;
  IdObjects ids_;
};

std::string bytes_arg(const py::bytes& b) { return std::string(b); }

}  // namespace

PYBIND11_MODULE(_bpe, m) {
  m.doc() = "Native byte-level BPE core of gpt2fast (pre-tokenizer, encoder, decoder, trainer).";
  py::register_exception<InputError>(m, "VocabularyError", PyExc_ValueError);

  py::class_<CoreBPE>(m, "CoreBPE")
      .def(py::init([](const std::vector<py::bytes>& tokens, const std::vector<std::pair<std::string, Rank>>& specials,
                       const std::vector<std::pair<Rank, Rank>>& merges) {
             Vocabulary v;
             for (const auto& t : tokens) v.tokens.push_back(bytes_arg(t));
             for (const auto& [text, id] : specials) v.specials.push_back({text, id});
             v.merges = merges;
             return CoreBPE::build(std::move(v));
           }),
           py::arg("tokens"), py::arg("specials"), py::arg("merges") = std::vector<std::pair<Rank, Rank>>{})
      .def_static("from_gpt2_files", [](const py::bytes& encoder_json, const py::bytes& vocab_bpe) {
             const std::string_view e = encoder_json, v = vocab_bpe;
             Vocabulary vocab;
             {
               py::gil_scoped_release nogil;
               vocab = parse_gpt2_files(e, v);
             }
             return CoreBPE::build(std::move(vocab));
           })
      .def_static("from_tiktoken", [](const py::bytes& text, const std::vector<std::pair<std::string, Rank>>& specials) {
             const std::string_view t = text;
             Vocabulary v;
             {
               py::gil_scoped_release nogil;
               v = parse_tiktoken(t);
             }
             for (const auto& [s, id] : specials) v.specials.push_back({s, id});
             return CoreBPE::build(std::move(v));
           })
      .def("encode_ordinary", &CoreBPE::encode_ordinary, py::arg("text"))
      .def("encode", &CoreBPE::encode, py::arg("text"), py::arg("allowed"))
      .def("encode_batch", &CoreBPE::encode_batch, py::arg("texts"), py::arg("allowed"), py::arg("ordinary"),
           py::arg("num_threads") = py::none())
      .def("find_special", &CoreBPE::find_special, py::arg("text"), py::arg("which"))
      .def("decode_bytes", &CoreBPE::decode_bytes, py::arg("ids"))
      .def("token_bytes", &CoreBPE::token_bytes, py::arg("id"))
      .def("merge_piece", &CoreBPE::merge_piece, py::arg("piece"), py::arg("heap"))
      .def("merges", &CoreBPE::merges)
      .def("specials", &CoreBPE::specials)
      .def("ordinary_tokens", &CoreBPE::ordinary_tokens)
      .def("rank_of", &CoreBPE::rank_of)
      .def_property_readonly("n_vocab", &CoreBPE::n_vocab)
      .def_property_readonly("n_ordinary", &CoreBPE::n_ordinary)
      .def_property_readonly("memory_bytes", &CoreBPE::memory_bytes);

  m.def("train", [](const py::list& texts, std::size_t n_ordinary, const std::vector<std::string>& split_on,
                    py::object num_threads) {
          std::vector<std::string_view> views(texts.size());
          for (std::size_t i = 0; i < views.size(); ++i)
            views[i] = utf8_of(texts[i], ("texts[" + std::to_string(i) + "]").c_str());
          const unsigned threads = resolve_threads(num_threads, views.size());
          TrainResult r;
          {
            py::gil_scoped_release nogil;
            r = train_bpe(views, n_ordinary, split_on, threads);
          }
          py::list tokens, merges;
          for (const auto& t : r.tokens) tokens.append(py::bytes(t));
          for (const auto& [a, b] : r.merges) merges.append(py::make_tuple(a, b));
          return py::make_tuple(tokens, merges);
        },
        py::arg("texts"), py::arg("n_ordinary"), py::arg("split_on"), py::arg("num_threads") = py::none());
  m.def("bytes_to_gpt2_text", [](const py::bytes& b) { return bytes_to_gpt2_text(std::string_view(b)); });
  m.def("pretokenize", [](const py::object& text) {
    const std::string_view s = utf8_of(text, "text");
    py::list pieces;
    pretokenize(s, [&](std::size_t off, std::size_t len) { pieces.append(py::str(s.data() + off, len)); });
    return pieces;
  });
}
