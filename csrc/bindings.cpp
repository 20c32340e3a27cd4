// Python bindings of the CPU kernels: module runtime._C.
//
// Every argument is validated here (dtype, rank, shape, C-contiguity, index
// ranges) and reported as ValueError naming the argument, the expected and
// the actual shape; only then is the GIL released and the plain-C kernel in
// ops.h called. Arrays are never silently converted: a float64 or strided
// array is an error, not a hidden copy.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "ops.h"
#include "decoder.h"
#include "qlinear.h"

namespace py = pybind11;
using lingli::Isa;

namespace {

std::string shape_str(const py::array& a) {
    std::ostringstream os;
    os << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (i) os << ", ";
        os << a.shape(i);
    }
    if (a.ndim() == 1) os << ",";
    os << ")";
    return os.str();
}

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// `what` is e.g. "linear: x"; `dims` the expected shape for messages, e.g. "[M, K]".
void check_array(const py::array& a, const std::string& what, py::ssize_t ndim,
                 const std::string& dims) {
    if (a.ndim() != ndim)
        fail(what + " must be " + std::to_string(ndim) + "-D " + dims + ", got shape " +
             shape_str(a));
    if (!(a.flags() & py::array::c_style))
        fail(what + " must be C-contiguous (shape " + shape_str(a) +
             "); pass numpy.ascontiguousarray(...)");
}

void check_dtype(const py::array& a, const std::string& what, const py::dtype& dt,
                 const char* name) {
    if (!a.dtype().is(dt))
        fail(what + " must be " + name + ", got " + std::string(py::str(a.dtype())));
}

bool is_f16(const py::array& a) { return a.dtype().kind() == 'f' && a.dtype().itemsize() == 2; }

void check_f32(const py::array& a, const std::string& what, py::ssize_t ndim, const std::string& dims) {
    check_dtype(a, what, py::dtype::of<float>(), "float32");
    check_array(a, what, ndim, dims);
}

void check_i32(const py::array& a, const std::string& what, py::ssize_t ndim, const std::string& dims) {
    check_dtype(a, what, py::dtype::of<int32_t>(), "int32");
    check_array(a, what, ndim, dims);
}

void check_writeable(const py::array& a, const std::string& what) {
    if (!a.writeable()) fail(what + " must be writeable (it is modified in place)");
}

// Expected dims rendered as "[a, b]" for error messages.
std::string dims_str(std::initializer_list<py::ssize_t> d) {
    std::ostringstream os;
    os << "[";
    bool first = true;
    for (auto v : d) {
        if (!first) os << ", ";
        os << v;
        first = false;
    }
    os << "]";
    return os.str();
}

void check_shape(const py::array& a, const std::string& what, std::initializer_list<py::ssize_t> d,
                 const std::string& why) {
    py::ssize_t i = 0;
    for (auto v : d) {
        if (a.shape(i) != v)
            fail(what + " has shape " + shape_str(a) + ", expected " + dims_str(d) + " " + why);
        ++i;
    }
}

bool overlaps(const py::array& a, const py::array& b) {
    const char* a0 = static_cast<const char*>(a.data());
    const char* b0 = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

py::array_t<float> new_f32(std::vector<py::ssize_t> shape) { return py::array_t<float>(shape); }

// ------------------------------------------------------------------- ops --

py::array linear(const py::array& x, const py::array& w, const py::object& out_obj) {
    check_f32(x, "linear: x", 2, "[M, K]");
    const py::ssize_t M = x.shape(0), K = x.shape(1);
    const bool half = w.dtype().kind() == 'f' && w.dtype().itemsize() == 2;
    if (!half && !w.dtype().is(py::dtype::of<float>()))
        fail("linear: w must be float32 or float16, got " + std::string(py::str(w.dtype())));
    check_array(w, "linear: w", 2, "[N, K]");
    const py::ssize_t N = w.shape(0);
    check_shape(w, "linear: w", {N, K}, "(K=" + std::to_string(K) + " from x)");

    py::array out;
    if (out_obj.is_none()) {
        out = new_f32({M, N});
    } else {
        if (!py::isinstance<py::array>(out_obj))
            fail("linear: out must be a numpy float32 array of shape " + dims_str({M, N}));
        out = py::reinterpret_borrow<py::array>(out_obj);
        check_f32(out, "linear: out", 2, "[M, N]");
        check_shape(out, "linear: out", {M, N}, "(M from x, N from w)");
        check_writeable(out, "linear: out");
        if (overlaps(out, x) || overlaps(out, w)) fail("linear: out must not overlap x or w");
    }
    const float* xp = static_cast<const float*>(x.data());
    float* yp = static_cast<float*>(out.mutable_data());
    {
        py::gil_scoped_release nogil;
        if (half)
            lingli::linear_f16(xp, static_cast<const uint16_t*>(w.data()), yp, M, N, K);
        else
            lingli::linear_f32(xp, static_cast<const float*>(w.data()), yp, M, N, K);
    }
    return out;
}

py::array rms_norm(const py::array& x, const py::array& weight, double eps) {
    check_f32(x, "rms_norm: x", 2, "[M, D]");
    check_f32(weight, "rms_norm: weight", 1, "[D]");
    const py::ssize_t M = x.shape(0), D = x.shape(1);
    check_shape(weight, "rms_norm: weight", {D}, "(D from x)");
    if (!(eps >= 0)) fail("rms_norm: eps must be >= 0, got " + std::to_string(eps));
    auto y = new_f32({M, D});
    const float* xp = static_cast<const float*>(x.data());
    const float* wp = static_cast<const float*>(weight.data());
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release nogil;
        lingli::rms_norm(xp, wp, yp, M, D, static_cast<float>(eps));
    }
    return y;
}

// The rotary tables cos/sin [P, R/2] against head dim Dh (of `xdesc`) and
// positions [T] (each in [0, P)); returns R/2.
py::ssize_t check_rope(const std::string& who, const py::array& positions, const py::array& cos,
                       const py::array& sin, py::ssize_t T, py::ssize_t Dh, const std::string& xdesc) {
    check_i32(positions, who + ": positions", 1, "[T]");
    check_f32(cos, who + ": cos", 2, "[P, R/2]");
    check_f32(sin, who + ": sin", 2, "[P, R/2]");
    const py::ssize_t P = cos.shape(0), half = cos.shape(1);
    check_shape(positions, who + ": positions", {T}, "(T from x)");
    check_shape(sin, who + ": sin", {P, half}, "(same as cos)");
    if (2 * half > Dh)
        fail(who + ": rotary dim R = 2*cos.shape[1] = " + std::to_string(2 * half) +
             " exceeds head dim Dh = " + std::to_string(Dh) + " of " + xdesc);
    const int32_t* pos = static_cast<const int32_t*>(positions.data());
    for (py::ssize_t t = 0; t < T; ++t)
        if (pos[t] < 0 || pos[t] >= P)
            fail(who + ": positions[" + std::to_string(t) + "] = " + std::to_string(pos[t]) +
                 " is out of range [0, " + std::to_string(P) + ") of the cos/sin tables");
    return half;
}

void rope_(py::array x, const py::array& positions, const py::array& cos,
           const py::array& sin, bool interleaved) {
    check_f32(x, "rope_: x", 3, "[T, H, Dh]");
    check_writeable(x, "rope_: x");
    const py::ssize_t T = x.shape(0), H = x.shape(1), Dh = x.shape(2);
    const py::ssize_t half = check_rope("rope_", positions, cos, sin, T, Dh, "x " + shape_str(x));
    const int32_t* pos = static_cast<const int32_t*>(positions.data());
    float* xp = static_cast<float*>(x.mutable_data());
    const float* cp = static_cast<const float*>(cos.data());
    const float* sp = static_cast<const float*>(sin.data());
    py::gil_scoped_release nogil;
    lingli::rope(xp, pos, cp, sp, T, H, Dh, half, interleaved);
}

// A 2-D float32 array whose rows are each contiguous (C-contiguous, or a
// column slice of one, like the gate and up halves of a fused product);
// returns the row stride in elements.
py::ssize_t check_f32_rows(const py::array& a, const std::string& what, const std::string& dims) {
    check_dtype(a, what, py::dtype::of<float>(), "float32");
    if (a.ndim() != 2) fail(what + " must be 2-D " + dims + ", got shape " + shape_str(a));
    const py::ssize_t M = a.shape(0), F = a.shape(1);
    const bool rows_ok = (F <= 1 || a.strides(1) == 4) && a.strides(0) % 4 == 0 &&
                         (M <= 1 || a.strides(0) >= F * 4);
    if (!rows_ok)
        fail(what + " must have contiguous rows (shape " + shape_str(a) +
             "); pass numpy.ascontiguousarray(...)");
    return M <= 1 ? F : a.strides(0) / 4;
}

py::array silu_mul(const py::array& gate, const py::array& up) {
    const py::ssize_t ldg = check_f32_rows(gate, "silu_mul: gate", "[M, F]");
    const py::ssize_t ldu = check_f32_rows(up, "silu_mul: up", "[M, F]");
    const py::ssize_t M = gate.shape(0), F = gate.shape(1);
    check_shape(up, "silu_mul: up", {M, F}, "(same as gate)");
    auto out = new_f32({M, F});
    const float* gp = static_cast<const float*>(gate.data());
    const float* upp = static_cast<const float*>(up.data());
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        lingli::silu_mul(gp, ldg, upp, ldu, op, M, F);
    }
    return out;
}

void softmax_(py::array x) {
    check_f32(x, "softmax_: x", 2, "[M, N]");
    check_writeable(x, "softmax_: x");
    float* xp = static_cast<float*>(x.mutable_data());
    const py::ssize_t M = x.shape(0), N = x.shape(1);
    py::gil_scoped_release nogil;
    lingli::softmax(xp, M, N);
}

// The KV cache pair: float32 or float16, both the same; true for float16.
bool check_kv(const py::array& k_cache, const py::array& v_cache, const std::string& op) {
    const bool half = is_f16(k_cache);
    const char* name = half ? "float16" : "float32";
    if (!half && !k_cache.dtype().is(py::dtype::of<float>()))
        fail(op + ": k_cache must be float32 or float16, got " + std::string(py::str(k_cache.dtype())));
    check_array(k_cache, op + ": k_cache", 4, "[num_blocks, Hkv, block_size, Dh]");
    if (!v_cache.dtype().is(k_cache.dtype()))
        fail(op + ": v_cache must be " + name + " like k_cache, got " + std::string(py::str(v_cache.dtype())));
    check_array(v_cache, op + ": v_cache", 4, "[num_blocks, Hkv, block_size, Dh]");
    return half;
}

// Every block each query reads (positions 0..qpos[t] of its sequence's row
// seq[t], row 0 without seq) is in its table row and names a real block.
void check_reads(const std::string& who, const int32_t* tables, py::ssize_t S, py::ssize_t nb, bool batched,
                 const int32_t* seq, const int32_t* qpos, py::ssize_t T, py::ssize_t NB, py::ssize_t BS) {
    for (py::ssize_t t = 0; t < T; ++t) {
        if (qpos[t] < 0)
            fail(who + ": q_positions[" + std::to_string(t) + "] = " + std::to_string(qpos[t]) + " is negative");
        const int64_t row = seq ? seq[t] : 0;
        if (row < 0 || row >= S)
            fail(who + ": seq_ids[" + std::to_string(t) + "] = " + std::to_string(row) +
                 " is out of range [0, " + std::to_string(S) + ") of the block_table rows");
        const int64_t needed = int64_t(qpos[t]) / BS + 1;
        if (needed > nb)
            fail(who + ": position " + std::to_string(qpos[t]) + " needs block_table[" +
                 std::to_string(needed - 1) + "] but block_table has only " + std::to_string(nb) +
                 " entries (block_size " + std::to_string(BS) + ")");
        for (int64_t i = 0; i < needed; ++i) {
            const int32_t b = tables[row * nb + i];
            if (b < 0 || b >= NB)
                fail(who + ": block_table[" + (batched ? std::to_string(row) + ", " : std::string()) +
                     std::to_string(i) + "] = " + std::to_string(b) + " is out of range [0, " +
                     std::to_string(NB) + ") of the cache blocks");
        }
    }
}

py::array paged_attention(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                          const py::array& block_table, const py::array& q_positions,
                          double scale, const py::object& seq_ids_obj) {
    check_f32(q, "paged_attention: q", 3, "[T, Hq, Dh]");
    const bool half = check_kv(k_cache, v_cache, "paged_attention");
    const bool batched = block_table.ndim() == 2;
    check_i32(block_table, "paged_attention: block_table", batched ? 2 : 1,
              batched ? "[S, nb]" : "[nb]");
    check_i32(q_positions, "paged_attention: q_positions", 1, "[T]");
    const py::ssize_t T = q.shape(0), Hq = q.shape(1), Dh = q.shape(2);
    const py::ssize_t NB = k_cache.shape(0), Hkv = k_cache.shape(1), BS = k_cache.shape(2);
    check_shape(k_cache, "paged_attention: k_cache", {NB, Hkv, BS, Dh}, "(Dh from q)");
    check_shape(v_cache, "paged_attention: v_cache", {NB, Hkv, BS, Dh}, "(same as k_cache)");
    check_shape(q_positions, "paged_attention: q_positions", {T}, "(T from q)");
    if (Hkv == 0 || Hq % Hkv != 0)
        fail("paged_attention: query heads Hq = " + std::to_string(Hq) +
             " must be a multiple of kv heads Hkv = " + std::to_string(Hkv));
    if (BS == 0) fail("paged_attention: block_size (k_cache.shape[2]) must be > 0");

    const py::ssize_t S = batched ? block_table.shape(0) : 1;
    const py::ssize_t nb = batched ? block_table.shape(1) : block_table.shape(0);
    const int32_t* seq = nullptr;
    py::array seq_ids;
    if (!seq_ids_obj.is_none()) {
        seq_ids = py::reinterpret_borrow<py::array>(seq_ids_obj);
        check_i32(seq_ids, "paged_attention: seq_ids", 1, "[T]");
        check_shape(seq_ids, "paged_attention: seq_ids", {T}, "(T from q)");
        seq = static_cast<const int32_t*>(seq_ids.data());
    } else if (S != 1) {
        fail("paged_attention: a 2-D block_table with " + std::to_string(S) +
             " rows needs seq_ids [T] naming each token's row");
    }
    const int32_t* qpos = static_cast<const int32_t*>(q_positions.data());
    const int32_t* tables = static_cast<const int32_t*>(block_table.data());
    check_reads("paged_attention", tables, S, nb, batched, seq, qpos, T, NB, BS);

    auto out = new_f32({T, Hq, Dh});
    const float* qp = static_cast<const float*>(q.data());
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        if (half)
            lingli::paged_attention(qp, static_cast<const uint16_t*>(k_cache.data()),
                                    static_cast<const uint16_t*>(v_cache.data()), tables, nb, seq, qpos,
                                    op, T, Hq, Hkv, Dh, BS, static_cast<float>(scale));
        else
            lingli::paged_attention(qp, static_cast<const float*>(k_cache.data()),
                                    static_cast<const float*>(v_cache.data()), tables, nb, seq, qpos,
                                    op, T, Hq, Hkv, Dh, BS, static_cast<float>(scale));
    }
    return out;
}

// Every token's cache slot: its sequence row (seq_ids[t]) in block_table [S, nb],
// its position within that row's blocks, the block within the NB of the pool.
void check_slots(const std::string& who, const py::array& block_table, const py::array& seq_ids,
                 const py::array& positions, py::ssize_t NB, py::ssize_t BS) {
    const py::ssize_t S = block_table.shape(0), nb = block_table.shape(1), T = positions.shape(0);
    const int32_t* tables = static_cast<const int32_t*>(block_table.data());
    const int32_t* sid = static_cast<const int32_t*>(seq_ids.data());
    const int32_t* pos = static_cast<const int32_t*>(positions.data());
    for (py::ssize_t t = 0; t < T; ++t) {
        if (sid[t] < 0 || sid[t] >= S)
            fail(who + ": seq_ids[" + std::to_string(t) + "] = " + std::to_string(sid[t]) +
                 " is out of range [0, " + std::to_string(S) + ")");
        if (pos[t] < 0 || pos[t] / BS >= nb)
            fail(who + ": positions[" + std::to_string(t) + "] = " + std::to_string(pos[t]) +
                 " is outside the " + std::to_string(nb) + " blocks of its table row");
        const int32_t b = tables[int64_t(sid[t]) * nb + pos[t] / BS];
        if (b < 0 || b >= NB)
            fail(who + ": block " + std::to_string(b) + " for token " + std::to_string(t) +
                 " is out of range [0, " + std::to_string(NB) + ")");
    }
}

void paged_write(py::array k_cache, py::array v_cache, const py::array& block_table,
                 const py::array& seq_ids, const py::array& positions, const py::array& k,
                 const py::array& v) {
    const bool half = check_kv(k_cache, v_cache, "paged_write");
    check_writeable(k_cache, "paged_write: k_cache");
    check_writeable(v_cache, "paged_write: v_cache");
    check_i32(block_table, "paged_write: block_table", 2, "[S, nb]");
    check_i32(seq_ids, "paged_write: seq_ids", 1, "[T]");
    check_i32(positions, "paged_write: positions", 1, "[T]");
    check_f32(k, "paged_write: k", 3, "[T, Hkv, Dh]");
    check_f32(v, "paged_write: v", 3, "[T, Hkv, Dh]");
    const py::ssize_t NB = k_cache.shape(0), Hkv = k_cache.shape(1), BS = k_cache.shape(2),
                      Dh = k_cache.shape(3), T = positions.shape(0);
    check_shape(v_cache, "paged_write: v_cache", {NB, Hkv, BS, Dh}, "(same as k_cache)");
    check_shape(seq_ids, "paged_write: seq_ids", {T}, "(T from positions)");
    check_shape(k, "paged_write: k", {T, Hkv, Dh}, "(T from positions, Hkv and Dh from the cache)");
    check_shape(v, "paged_write: v", {T, Hkv, Dh}, "(same as k)");
    if (BS == 0) fail("paged_write: block_size (k_cache.shape[2]) must be > 0");
    check_slots("paged_write", block_table, seq_ids, positions, NB, BS);
    const py::ssize_t nb = block_table.shape(1);
    const int32_t* tables = static_cast<const int32_t*>(block_table.data());
    const int32_t* sid = static_cast<const int32_t*>(seq_ids.data());
    const int32_t* pos = static_cast<const int32_t*>(positions.data());
    const float* kp = static_cast<const float*>(k.data());
    const float* vp = static_cast<const float*>(v.data());
    py::gil_scoped_release nogil;
    if (half)
        lingli::paged_write(static_cast<uint16_t*>(k_cache.mutable_data()),
                            static_cast<uint16_t*>(v_cache.mutable_data()), tables, nb, sid, pos, kp, vp,
                            T, Hkv, Dh, BS);
    else
        lingli::paged_write(static_cast<float*>(k_cache.mutable_data()),
                            static_cast<float*>(v_cache.mutable_data()), tables, nb, sid, pos, kp, vp,
                            T, Hkv, Dh, BS);
}

// rope_write(qkv, hq, positions, cos, sin, interleaved, k_cache, v_cache,
// block_table, seq_ids) -> q [T, hq, Dh] (ops.h: rope_write).
py::array rope_write(const py::array& qkv, py::ssize_t hq, const py::array& positions, const py::array& cos,
                     const py::array& sin, bool interleaved, py::array k_cache, py::array v_cache,
                     const py::array& block_table, const py::array& seq_ids) {
    const bool half = check_kv(k_cache, v_cache, "rope_write");
    check_writeable(k_cache, "rope_write: k_cache");
    check_writeable(v_cache, "rope_write: v_cache");
    const py::ssize_t NB = k_cache.shape(0), Hkv = k_cache.shape(1), BS = k_cache.shape(2),
                      Dh = k_cache.shape(3);
    check_shape(v_cache, "rope_write: v_cache", {NB, Hkv, BS, Dh}, "(same as k_cache)");
    if (BS == 0) fail("rope_write: block_size (k_cache.shape[2]) must be > 0");
    if (hq <= 0 || hq % Hkv != 0)
        fail("rope_write: hq = " + std::to_string(hq) + " query heads must be a positive multiple of the "
             "cache's " + std::to_string(Hkv) + " kv heads");
    const py::ssize_t ld = check_f32_rows(qkv, "rope_write: qkv", "[T, (hq + 2 Hkv) Dh]");
    const py::ssize_t T = qkv.shape(0);
    check_shape(qkv, "rope_write: qkv", {T, (hq + 2 * Hkv) * Dh}, "(hq + 2 Hkv heads of Dh from the cache)");
    const py::ssize_t hr = check_rope("rope_write", positions, cos, sin, T, Dh, "the cache");
    check_i32(block_table, "rope_write: block_table", 2, "[S, nb]");
    check_i32(seq_ids, "rope_write: seq_ids", 1, "[T]");
    check_shape(seq_ids, "rope_write: seq_ids", {T}, "(T from qkv)");
    check_slots("rope_write", block_table, seq_ids, positions, NB, BS);
    auto q = new_f32({T, hq, Dh});
    const float* xp = static_cast<const float*>(qkv.data());
    float* qp = q.mutable_data();
    const int32_t* tables = static_cast<const int32_t*>(block_table.data());
    const int32_t* sid = static_cast<const int32_t*>(seq_ids.data());
    const int32_t* pos = static_cast<const int32_t*>(positions.data());
    const float* cp = static_cast<const float*>(cos.data());
    const float* sp = static_cast<const float*>(sin.data());
    const py::ssize_t nb = block_table.shape(1);
    py::gil_scoped_release nogil;
    if (half)
        lingli::rope_write(xp, ld, qp, static_cast<uint16_t*>(k_cache.mutable_data()),
                           static_cast<uint16_t*>(v_cache.mutable_data()), tables, nb, sid, pos, cp, sp, hr,
                           interleaved, T, hq, Hkv, Dh, BS);
    else
        lingli::rope_write(xp, ld, qp, static_cast<float*>(k_cache.mutable_data()),
                           static_cast<float*>(v_cache.mutable_data()), tables, nb, sid, pos, cp, sp, hr,
                           interleaved, T, hq, Hkv, Dh, BS);
    return q;
}

// ------------------------------------------------------------ qlinear ----


// dtype: 'h' float16, 'b' int8, 'B' uint8.
void check_q(const py::array& a, const std::string& what, char dt, std::initializer_list<py::ssize_t> d,
             const std::string& why) {
    bool ok;
    const char* name;
    switch (dt) {
        case 'h': ok = is_f16(a); name = "float16"; break;
        case 'b': ok = a.dtype().is(py::dtype::of<int8_t>()); name = "int8"; break;
        default: ok = a.dtype().is(py::dtype::of<uint8_t>()); name = "uint8"; break;
    }
    if (!ok) fail(what + " must be " + name + ", got " + std::string(py::str(a.dtype())));
    check_array(a, what, 2, dims_str(d));
    check_shape(a, what, d, why);
}

py::array opt_array(const py::object& o, const std::string& what) {
    if (!py::isinstance<py::array>(o)) fail(what + " must be a numpy array or None");
    return py::reinterpret_borrow<py::array>(o);
}

py::tuple quantize_acts(const py::array& x, int64_t kp) {
    check_f32(x, "quantize_acts: x", 2, "[M, K]");
    const py::ssize_t M = x.shape(0), K = x.shape(1);
    if (kp % lingli::QBLOCK != 0 || kp < K)
        fail("quantize_acts: kp must be a multiple of 32 and >= K = " + std::to_string(K) +
             ", got " + std::to_string(kp));
    const py::ssize_t nb = kp / lingli::QBLOCK;
    py::array_t<int8_t> q({M, static_cast<py::ssize_t>(kp)});
    py::array_t<float> d({M, nb});
    py::array_t<int32_t> sums({M, nb});
    const float* xp = static_cast<const float*>(x.data());
    int8_t* qp = q.mutable_data();
    float* dp = d.mutable_data();
    int32_t* sp = sums.mutable_data();
    {
        py::gil_scoped_release nogil;
        lingli::quantize_acts(xp, M, K, kp, qp, dp, sp);
    }
    return py::make_tuple(q, d, sums);
}

// qlinear's prefetch argument: (k, v, ranges) -> a PrefetchPlan over the
// arrays' bytes (qlinear.h), every range checked to lie inside both.
lingli::PrefetchPlan prefetch_plan(const py::object& o) {
    static const std::string kWhat =
        "qlinear: prefetch must be None or a tuple (k, v, ranges): two C-contiguous arrays of the "
        "same byte size and ranges int64 [n, 2] of (byte offset, bytes) inside them";
    if (!py::isinstance<py::tuple>(o) || py::len(o) != 3) fail(kWhat);
    const py::tuple t = py::reinterpret_borrow<py::tuple>(o);
    for (int i = 0; i < 2; ++i)
        if (!py::isinstance<py::array>(t[i])) fail(kWhat);
    const py::array k = t[0].cast<py::array>(), v = t[1].cast<py::array>();
    if (!(k.flags() & py::array::c_style) || !(v.flags() & py::array::c_style) || k.nbytes() != v.nbytes())
        fail(kWhat + "; got k " + shape_str(k) + " and v " + shape_str(v));
    if (!py::isinstance<py::array>(t[2])) fail(kWhat);
    const py::array r = t[2].cast<py::array>();
    if (!r.dtype().is(py::dtype::of<int64_t>())) fail(kWhat + "; ranges is " + std::string(py::str(r.dtype())));
    check_array(r, "qlinear: prefetch ranges", 2, "[n, 2]");
    if (r.shape(1) != 2) fail("qlinear: prefetch ranges has shape " + shape_str(r) + ", expected (n, 2)");
    const int64_t* rp = static_cast<const int64_t*>(r.data());
    const int64_t n = r.shape(0), size = k.nbytes();
    for (int64_t i = 0; i < n; ++i)
        if (rp[2 * i] < 0 || rp[2 * i + 1] < 0 || rp[2 * i] > size - rp[2 * i + 1])
            fail("qlinear: prefetch range " + std::to_string(i) + " (offset " + std::to_string(rp[2 * i]) +
                 ", " + std::to_string(rp[2 * i + 1]) + " bytes) is outside the arrays' " + std::to_string(size) +
                 " bytes");
    return {{static_cast<const char*>(k.data()), static_cast<const char*>(v.data())}, rp, n};
}

// One quantized weight's arrays checked against its format and the input
// size K (messages start with `who`); its arrays are appended to `inputs`.
lingli::QMatrix qweight(const std::string& who, py::ssize_t K, int bits, int group_size, const py::array& q,
                        const py::object& qh_obj, const py::array& scales, const py::object& mins_obj,
                        const py::object& row_scale_obj, const py::object& code_sums_obj,
                        std::vector<py::array>& inputs) {
    if (bits != 8 && bits != 4 && bits != 3)
        fail(who + ": bits must be 8, 4 or 3, got " + std::to_string(bits));
    if (group_size != 32 && group_size != 64 && group_size != 128)
        fail(who + ": group_size must be 32, 64 or 128, got " + std::to_string(group_size));
    const std::string fmt = "int" + std::to_string(bits);
    // int4/int3: the scales' dtype picks the encoding (qlinear.h: group parameters).
    static const std::string kValid =
        " (int4/int3 take scales float16 + mins float16 + row_scale None, or scales uint8 + mins int8 + "
        "row_scale float32 [N])";
    const bool coded = bits != 8 && scales.dtype().is(py::dtype::of<uint8_t>());
    if (bits == 8 && !is_f16(scales))
        fail(who + ": scales must be float16 for int8, got " + std::string(py::str(scales.dtype())));
    if (bits != 8 && !coded && !is_f16(scales))
        fail(who + ": scales must be float16 or uint8 (the scale codes) for " + fmt + ", got " +
             std::string(py::str(scales.dtype())) + kValid);
    check_array(scales, who + ": scales", 2, "[N, Kp/G]");
    const py::ssize_t N = scales.shape(0), ng = scales.shape(1), Kp = ng * group_size;
    if (K > Kp || Kp - K >= group_size)
        fail(who + ": x has K = " + std::to_string(K) + " inputs but scales " + shape_str(scales) +
             " imply Kp = " + std::to_string(Kp) + " (group_size " + std::to_string(group_size) +
             "); need Kp - group_size < K <= Kp");
    const std::string why = "(N, Kp = " + std::to_string(N) + ", " + std::to_string(Kp) +
                            " from scales, " + fmt + ")";
    inputs.push_back(q);
    inputs.push_back(scales);
    if (bits == 8) check_q(q, who + ": q", 'b', {N, Kp}, why);
    else if (bits == 4) check_q(q, who + ": q", 'B', {N, Kp / 2}, why);
    else check_q(q, who + ": q", 'B', {N, Kp / 4}, why);
    const uint8_t* qhp = nullptr;
    if (bits == 3) {
        if (qh_obj.is_none()) fail(who + ": int3 needs qh (the high bit plane), got None");
        py::array qh = opt_array(qh_obj, who + ": qh");
        check_q(qh, who + ": qh", 'B', {N, Kp / 8}, why);
        qhp = static_cast<const uint8_t*>(qh.data());
        inputs.push_back(qh);
    } else if (!qh_obj.is_none()) {
        fail(who + ": qh must be None for " + fmt + " (only int3 has a high bit plane)");
    }
    const void* minsp = nullptr;
    const float* rsp = nullptr;
    if (bits == 8) {
        if (!mins_obj.is_none()) fail(who + ": mins must be None for int8 (it is symmetric)");
        if (!row_scale_obj.is_none())
            fail(who + ": row_scale must be None for int8 (its float16 scales need none)");
    } else {
        const std::string enc = coded ? "uint8 scales" : "float16 scales";
        if (mins_obj.is_none())
            fail(who + ": " + fmt + " needs mins (" + (coded ? "int8 min codes" : "float16") + " with " + enc +
                 "), got None" + kValid);
        py::array mins = opt_array(mins_obj, who + ": mins");
        if (coded ? !mins.dtype().is(py::dtype::of<int8_t>()) : !is_f16(mins))
            fail(who + ": mins must be " + std::string(coded ? "int8 (the min codes)" : "float16") + " with " + enc +
                 ", got " + std::string(py::str(mins.dtype())) + kValid);
        check_q(mins, who + ": mins", coded ? 'b' : 'h', {N, ng}, "(same as scales)");
        minsp = mins.data();
        inputs.push_back(mins);
        if (coded) {
            if (row_scale_obj.is_none())
                fail(who + ": " + fmt + " needs row_scale (float32 [N]) with uint8 scales, got None" + kValid);
            py::array rs = opt_array(row_scale_obj, who + ": row_scale");
            check_f32(rs, who + ": row_scale", 1, "[N]");
            check_shape(rs, who + ": row_scale", {N}, "(N from scales)");
            rsp = static_cast<const float*>(rs.data());
            inputs.push_back(rs);
        } else if (!row_scale_obj.is_none()) {
            fail(who + ": row_scale must be None with float16 scales and mins" + kValid);
        }
    }
    const int16_t* csp = nullptr;
    if (!code_sums_obj.is_none()) {
        if (bits != 8) fail(who + ": code_sums must be None for " + fmt + " (only int8 takes them)");
        py::array cs = opt_array(code_sums_obj, who + ": code_sums");
        if (!cs.dtype().is(py::dtype::of<int16_t>()))
            fail(who + ": code_sums must be int16, got " + std::string(py::str(cs.dtype())));
        check_array(cs, who + ": code_sums", 2, "[N, Kp/32]");
        check_shape(cs, who + ": code_sums", {N, Kp / lingli::QBLOCK}, why);
        csp = static_cast<const int16_t*>(cs.data());
        inputs.push_back(cs);
    }
    const void* sp = scales.data();
    return lingli::QMatrix{bits, group_size, N, K, Kp, static_cast<const uint8_t*>(q.data()), qhp,
                           coded ? nullptr : static_cast<const uint16_t*>(sp),
                           coded ? nullptr : static_cast<const uint16_t*>(minsp),
                           coded ? static_cast<const uint8_t*>(sp) : nullptr,
                           coded ? static_cast<const int8_t*>(minsp) : nullptr, rsp, csp};
}

// A product's output: new, or `out_obj` checked to be a writeable float32
// [M, N] array that overlaps none of `inputs`.
py::array out_array(const std::string& who, const py::object& out_obj, py::ssize_t M, py::ssize_t N,
                    const std::vector<py::array>& inputs) {
    if (out_obj.is_none()) return new_f32({M, N});
    if (!py::isinstance<py::array>(out_obj))
        fail(who + ": out must be a numpy float32 array of shape " + dims_str({M, N}));
    py::array out = py::reinterpret_borrow<py::array>(out_obj);
    check_f32(out, who + ": out", 2, "[M, N]");
    check_shape(out, who + ": out", {M, N}, "(M from x, N from scales)");
    check_writeable(out, who + ": out");
    for (const py::array& in : inputs)
        if (overlaps(out, in)) fail(who + ": out must not overlap its inputs");
    return out;
}

// out[M, sum of n] = x @ [W_0; ...].T for checked weights (the GIL released;
// an empty K gives zeros). prefetch: qlinear's (k, v, ranges) or None.
void run_products(const py::array& x, const std::vector<lingli::QMatrix>& ws, py::array& out, int act_steps,
                  const py::object& prefetch_obj) {
    // (The tuple's arrays outlive the call: the caller holds the tuple.)
    lingli::PrefetchPlan plan{};
    if (!prefetch_obj.is_none()) plan = prefetch_plan(prefetch_obj);
    const py::ssize_t M = out.shape(0), N = out.shape(1);
    const float* xp = static_cast<const float*>(x.data());
    float* yp = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    const lingli::PrefetchPlan* pp = plan.n > 0 ? &plan : nullptr;
    if (M > 0 && N > 0 && ws[0].kp == 0)
        std::fill(yp, yp + M * N, 0.f);
    else if (ws.size() == 1)
        lingli::qlinear(xp, M, ws[0], yp, act_steps, pp);
    else
        lingli::qlinear_parts(xp, M, ws.data(), static_cast<int>(ws.size()), yp, act_steps, pp);
}

py::array qlinear(const py::array& x, int bits, int group_size, const py::array& q,
                  const py::object& qh_obj, const py::array& scales, const py::object& mins_obj,
                  const py::object& row_scale_obj, const py::object& out_obj, int act_steps,
                  const py::object& code_sums_obj, const py::object& prefetch_obj) {
    if (act_steps != 1 && act_steps != 2)
        fail("qlinear: act_steps must be 1 or 2, got " + std::to_string(act_steps));
    check_f32(x, "qlinear: x", 2, "[M, K]");
    const py::ssize_t M = x.shape(0), K = x.shape(1);
    std::vector<py::array> inputs{x};
    const lingli::QMatrix w = qweight("qlinear", K, bits, group_size, q, qh_obj, scales, mins_obj, row_scale_obj,
                                      code_sums_obj, inputs);
    const py::ssize_t N = w.n;
    py::array out = out_array("qlinear", out_obj, M, N, inputs);
    run_products(x, {w}, out, act_steps, prefetch_obj);
    return out;
}

// qlinear_parts(x, parts, out=None, prefetch=None): the products of x with
// several quantized matrices side by side (qlinear.h: qlinear_parts). Each part
// is the tuple (bits, group_size, q, qh, scales, mins, row_scale, act_steps,
// code_sums) of qlinear's arguments; all take the same act_steps.
// Quantized parts [(bits, group_size, q, qh, scales, mins, row_scale, act_steps,
// code_sums), ...] with K inputs each, checked (messages name `who` and the
// part); their arrays go to `inputs`, their common act_steps to `act_steps`.
std::vector<lingli::QMatrix> qparts(const std::string& who, py::ssize_t K, const py::sequence& parts,
                                    std::vector<py::array>& inputs, int& act_steps) {
    const py::ssize_t np_ = py::len(parts);
    if (np_ < 1 || np_ > lingli::kMaxParts)
        fail(who + ": parts must hold 1 to " + std::to_string(lingli::kMaxParts) + " matrices, got " +
             std::to_string(np_));
    std::vector<lingli::QMatrix> ws;
    for (py::ssize_t i = 0; i < np_; ++i) {
        const std::string part = who + ": part " + std::to_string(i);
        const py::object item = parts[i];
        if (!py::isinstance<py::tuple>(item) || py::len(item) != 9)
            fail(part + " must be a tuple (bits, group_size, q, qh, scales, mins, row_scale, act_steps, "
                        "code_sums)");
        const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
        const int steps = t[7].cast<int>();
        if (steps != 1 && steps != 2) fail(part + ": act_steps must be 1 or 2, got " + std::to_string(steps));
        if (i > 0 && steps != act_steps)
            fail(part + ": act_steps " + std::to_string(steps) + " differs from part 0's " +
                 std::to_string(act_steps) + " (the parts share one quantization of x)");
        act_steps = steps;
        if (!py::isinstance<py::array>(t[2]) || !py::isinstance<py::array>(t[4]))
            fail(part + ": q and scales must be numpy arrays");
        ws.push_back(qweight(part, K, t[0].cast<int>(), t[1].cast<int>(), t[2].cast<py::array>(), t[3],
                             t[4].cast<py::array>(), t[5], t[6], t[8], inputs));
    }
    return ws;
}

// qlinear_parts(x, parts, out=None, prefetch=None): the products of x with
// several quantized matrices side by side (qlinear.h: qlinear_parts). Each part
// is the tuple (bits, group_size, q, qh, scales, mins, row_scale, act_steps,
// code_sums) of qlinear's arguments; all take the same act_steps.
py::array qlinear_parts(const py::array& x, const py::sequence& parts, const py::object& out_obj,
                        const py::object& prefetch_obj) {
    check_f32(x, "qlinear_parts: x", 2, "[M, K]");
    const py::ssize_t M = x.shape(0), K = x.shape(1);
    std::vector<py::array> inputs{x};
    int act_steps = 0;
    const std::vector<lingli::QMatrix> ws = qparts("qlinear_parts", K, parts, inputs, act_steps);
    py::ssize_t N = 0;
    for (const auto& w : ws) N += w.n;
    py::array out = out_array("qlinear_parts", out_obj, M, N, inputs);
    run_products(x, ws, out, act_steps, prefetch_obj);
    return out;
}

// ------------------------------------------------------------- decoder ----

// DecoderStack(hidden, heads, kv_heads, head_dim, ffn, eps, layers): a model's
// decoder layers, checked once, run by forward() in one call (decoder.h).
// Each layer is (attn_norm, wqkv, bqkv, wo, bo, mlp_norm, w_gate_up,
// b_gate_up, w_down, b_down); a weight is a float32/float16 array [N, K] or
// a list of quantized parts as qlinear_parts takes them; biases None or
// float32 [N]. The stack holds references to every array it points into.
class DecoderStack {
public:
    DecoderStack(py::ssize_t hidden, py::ssize_t heads, py::ssize_t kv_heads, py::ssize_t head_dim,
                 py::ssize_t ffn, double eps, const py::sequence& layers) {
        if (hidden < 1 || heads < 1 || kv_heads < 1 || head_dim < 1 || ffn < 1 || heads % kv_heads != 0)
            fail("DecoderStack: need hidden, heads, kv_heads, head_dim, ffn >= 1 and heads a multiple of "
                 "kv_heads, got " + std::to_string(hidden) + ", " + std::to_string(heads) + ", " +
                 std::to_string(kv_heads) + ", " + std::to_string(head_dim) + ", " + std::to_string(ffn));
        if (!(eps >= 0)) fail("DecoderStack: eps must be >= 0, got " + std::to_string(eps));
        dims_ = {hidden, heads, kv_heads, head_dim, ffn, static_cast<float>(eps), 1.f, 0, false};
        const py::ssize_t nqkv = (heads + 2 * kv_heads) * head_dim;
        for (py::ssize_t i = 0; i < py::len(layers); ++i) {
            const std::string who = "DecoderStack: layer " + std::to_string(i);
            const py::object item = layers[i];
            if (!py::isinstance<py::tuple>(item) || py::len(item) != 10)
                fail(who + " must be a tuple (attn_norm, wqkv, bqkv, wo, bo, mlp_norm, w_gate_up, b_gate_up, "
                           "w_down, b_down)");
            const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
            lingli::DecoderLayer L{};
            L.attn_norm = vec(who + ": attn_norm", t[0], hidden, false);
            L.qkv = dense(who + ": wqkv", t[1], t[2], nqkv, hidden);
            L.o = dense(who + ": wo", t[3], t[4], hidden, heads * head_dim);
            L.mlp_norm = vec(who + ": mlp_norm", t[5], hidden, false);
            L.gate_up = dense(who + ": w_gate_up", t[6], t[7], 2 * ffn, hidden);
            L.down = dense(who + ": w_down", t[8], t[9], hidden, ffn);
            layers_.push_back(std::move(L));
        }
    }

    py::ssize_t num_layers() const { return static_cast<py::ssize_t>(layers_.size()); }

    // x [T, hidden] += every layer, in place; the other arguments as the Python
    // loop's kernels take them (positions, cos/sin tables, the caches' per-layer
    // K and V arrays, block_tables [S, nb], seq_ids [T], the attention scale;
    // ranges: kv_ranges' int64 [n, 2] or None).
    void forward(py::array x, const py::array& positions, const py::array& cos, const py::array& sin,
                 bool interleaved, double scale, const py::sequence& k_caches, const py::sequence& v_caches,
                 const py::array& block_table, const py::array& seq_ids, const py::object& ranges) {
        const std::string who = "DecoderStack.forward";
        const py::ssize_t H = dims_.hidden, L = num_layers();
        check_f32(x, who + ": x", 2, "[T, hidden]");
        check_writeable(x, who + ": x");
        const py::ssize_t T = x.shape(0);
        check_shape(x, who + ": x", {T, H}, "(hidden from the weights)");
        lingli::DecoderDims d = dims_;
        d.half_rot = check_rope(who, positions, cos, sin, T, d.head_dim, "the cache");
        d.interleaved = interleaved;
        d.scale = static_cast<float>(scale);
        if (py::len(k_caches) != L || py::len(v_caches) != L)
            fail(who + ": k_caches and v_caches need one array per layer (" + std::to_string(L) + "), got " +
                 std::to_string(py::len(k_caches)) + " and " + std::to_string(py::len(v_caches)));
        std::vector<py::array> ks, vs;
        bool half = false;
        py::ssize_t NB = 0, BS = 0;
        for (py::ssize_t i = 0; i < L; ++i) {
            const std::string lw = who + ": layer " + std::to_string(i);
            if (!py::isinstance<py::array>(k_caches[i]) || !py::isinstance<py::array>(v_caches[i]))
                fail(lw + ": k_caches and v_caches must hold numpy arrays");
            ks.push_back(k_caches[i].cast<py::array>());
            vs.push_back(v_caches[i].cast<py::array>());
            const bool h = check_kv(ks[i], vs[i], lw);
            if (i == 0) {
                half = h, NB = ks[0].shape(0), BS = ks[0].shape(2);
                if (BS == 0) fail(lw + ": block_size (k_cache.shape[2]) must be > 0");
            } else if (h != half) {
                fail(lw + ": the cache's dtype differs from layer 0's");
            }
            check_shape(ks[i], lw + ": k_cache", {NB, d.kv_heads, BS, d.head_dim},
                        "(num_blocks and block_size from layer 0, heads from the weights)");
            check_shape(vs[i], lw + ": v_cache", {NB, d.kv_heads, BS, d.head_dim}, "(same as k_cache)");
            check_writeable(ks[i], lw + ": k_cache");
            check_writeable(vs[i], lw + ": v_cache");
        }
        check_i32(block_table, who + ": block_table", 2, "[S, nb]");
        check_i32(seq_ids, who + ": seq_ids", 1, "[T]");
        check_shape(seq_ids, who + ": seq_ids", {T}, "(T from x)");
        const int32_t* tables = static_cast<const int32_t*>(block_table.data());
        const int32_t* sid = static_cast<const int32_t*>(seq_ids.data());
        const int32_t* pos = static_cast<const int32_t*>(positions.data());
        const py::ssize_t S = block_table.shape(0), nb = block_table.shape(1);
        check_slots(who, block_table, seq_ids, positions, NB, BS);
        check_reads(who, tables, S, nb, true, sid, pos, T, NB, BS);
        lingli::PrefetchPlan plan{};
        if (!ranges.is_none() && L > 0) plan = prefetch_plan(py::make_tuple(ks[0], vs[0], ranges));

        std::vector<void*> kp(L), vp(L);
        for (py::ssize_t i = 0; i < L; ++i) kp[i] = ks[i].mutable_data(), vp[i] = vs[i].mutable_data();
        float* xp = static_cast<float*>(x.mutable_data());
        const float* cp = static_cast<const float*>(cos.data());
        const float* sp = static_cast<const float*>(sin.data());
        py::gil_scoped_release nogil;
        if (half)
            run<uint16_t>(kp, vp, BS, tables, nb, sid, plan, d, xp, T, pos, cp, sp);
        else
            run<float>(kp, vp, BS, tables, nb, sid, plan, d, xp, T, pos, cp, sp);
    }

private:
    template <typename KV>
    void run(const std::vector<void*>& kp, const std::vector<void*>& vp, py::ssize_t BS, const int32_t* tables,
             py::ssize_t nb, const int32_t* sid, const lingli::PrefetchPlan& plan, const lingli::DecoderDims& d,
             float* x, py::ssize_t T, const int32_t* pos, const float* cos, const float* sin) const {
        std::vector<KV*> k(kp.size()), v(vp.size());
        for (size_t i = 0; i < kp.size(); ++i) k[i] = static_cast<KV*>(kp[i]), v[i] = static_cast<KV*>(vp[i]);
        const lingli::DecoderCache<KV> c{k.data(), v.data(), BS, tables, nb, sid, plan.ranges, plan.n};
        lingli::decoder_layers(layers_.data(), num_layers(), d, x, T, pos, cos, sin, c);
    }

    // A float32 vector [n] (a norm weight, or a bias where `optional`).
    const float* vec(const std::string& what, const py::handle& o, py::ssize_t n, bool optional) {
        if (optional && o.is_none()) return nullptr;
        if (!py::isinstance<py::array>(o)) fail(what + " must be a numpy float32 array [" + std::to_string(n) + "]");
        py::array a = py::reinterpret_borrow<py::array>(o);
        check_f32(a, what, 1, "[N]");
        check_shape(a, what, {n}, "(from the model's dimensions)");
        keep_.push_back(a);
        return static_cast<const float*>(a.data());
    }

    lingli::DenseWeight dense(const std::string& what, const py::handle& w, const py::handle& bias,
                              py::ssize_t n, py::ssize_t k) {
        lingli::DenseWeight d;
        d.n = n, d.k = k;
        if (py::isinstance<py::array>(w)) {
            py::array a = py::reinterpret_borrow<py::array>(w);
            const bool half = is_f16(a);
            if (!half && !a.dtype().is(py::dtype::of<float>()))
                fail(what + " must be float32 or float16, got " + std::string(py::str(a.dtype())));
            check_array(a, what, 2, "[N, K]");
            check_shape(a, what, {n, k}, "(from the model's dimensions)");
            keep_.push_back(a);
            if (half) d.f16 = static_cast<const uint16_t*>(a.data());
            else d.f32 = static_cast<const float*>(a.data());
        } else {
            if (!py::isinstance<py::sequence>(w) || py::isinstance<py::str>(w))
                fail(what + " must be a float array or a list of quantized parts");
            d.parts = qparts(what, k, py::reinterpret_borrow<py::sequence>(w), keep_, d.act_steps);
            py::ssize_t rows = 0;
            for (const auto& p : d.parts) rows += p.n;
            if (rows != n)
                fail(what + ": the parts have " + std::to_string(rows) + " rows, expected " + std::to_string(n));
        }
        d.bias = vec(what + " bias", bias, n, true);
        return d;
    }

    lingli::DecoderDims dims_{};
    std::vector<lingli::DecoderLayer> layers_;
    std::vector<py::array> keep_;  // every array the layers point into
};

// ------------------------------------------------------------ dispatch ----

Isa parse_isa(const std::string& name, const char* source) {
    Isa isa;
    if (!lingli::isa_from_name(name, &isa))
        fail(std::string(source) + ": unknown ISA '" + name +
             "' (expected one of plain, neon, avx2, avx512)");
    if (!lingli::cpu_has(isa)) {
        std::string avail;
        for (Isa a : lingli::available_isas()) avail += std::string(avail.empty() ? "" : ", ") + lingli::isa_name(a);
        fail(std::string(source) + ": ISA '" + name + "' is not supported by this CPU (available: " +
             avail + ")");
    }
    return isa;
}

std::vector<std::string> available_isa_names() {
    std::vector<std::string> out;
    for (Isa a : lingli::available_isas()) out.push_back(lingli::isa_name(a));
    return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "Lingli CPU kernels (float32 activations; float32 or float16 weights).";

    // LINGLI_ISA forces a path at import; a bad value makes the import fail
    // with the message below rather than silently using another path.
    if (const char* env = std::getenv("LINGLI_ISA"); env && *env)
        lingli::set_isa(parse_isa(env, "LINGLI_ISA"));

    m.def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("out") = py::none(),
          "y[M,N] = x[M,K] @ w[N,K].T; w float32 or float16; writes into `out` if given.");
    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
          "y = x / sqrt(mean(x^2, -1) + eps) * weight for x[M,D], weight[D].");
    m.def("rope_", &rope_, py::arg("x"), py::arg("positions"), py::arg("cos"), py::arg("sin"),
          py::arg("interleaved"),
          "In-place rotary embedding of x[T,H,Dh] with cos/sin[P,R/2]; "
          "interleaved=False pairs (i, i+R/2), True pairs (2i, 2i+1).");
    m.def("silu_mul", &silu_mul, py::arg("gate"), py::arg("up"), "silu(gate) * up");
    m.def("softmax_", &softmax_, py::arg("x"), "In-place stable softmax over rows of x[M,N].");
    m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("block_table"), py::arg("q_positions"), py::arg("scale"),
          py::arg("seq_ids") = py::none(),
          "Causal attention of q[T,Hq,Dh] over a paged cache [num_blocks,Hkv,block_size,Dh]. "
          "block_table [nb] (one sequence) or [S, nb] with seq_ids int32 [T] naming each "
          "token's row; token t sees its sequence's positions 0..q_positions[t].");

    m.def("paged_write", &paged_write, py::arg("k_cache"), py::arg("v_cache"),
          py::arg("block_table"), py::arg("seq_ids"), py::arg("positions"), py::arg("k"),
          py::arg("v"),
          "Store k, v [T,Hkv,Dh] in place at each token's slot: block "
          "block_table[seq_ids[t], positions[t] // block_size], slot positions[t] % block_size.");

    m.def("rope_write", &rope_write, py::arg("qkv"), py::arg("hq"), py::arg("positions"), py::arg("cos"),
          py::arg("sin"), py::arg("interleaved"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"),
          py::arg("seq_ids"),
          "A fused q/k/v product's rows qkv [T, (hq + 2 Hkv) Dh] (rows contiguous): returns the queries "
          "rotated (rope_) as [T, hq, Dh]; the keys, rotated, and the values go to the cache as paged_write "
          "stores them. The same floats as rope_ on q and k and then paged_write.");

    m.def("quantize_acts", &quantize_acts, py::arg("x"), py::arg("kp"),
          "Quantize x[M,K] per 32-input block: (q int8 [M,kp], d float32 [M,kp/32], "
          "sums int32 [M,kp/32]) with d = max|x|/127, q = nearbyint(x/d); inputs past K are 0.");
    m.def("qlinear", &qlinear, py::arg("x"), py::arg("bits"), py::arg("group_size"), py::arg("q"),
          py::arg("qh"), py::arg("scales"), py::arg("mins"), py::arg("row_scale"), py::arg("out") = py::none(),
          py::arg("act_steps") = 1, py::arg("code_sums") = py::none(), py::arg("prefetch") = py::none(),
          "y[M,N] = x[M,K] @ W.T for W in Lingli's int8/int4/int3 layout (runtime.quant.formats); "
          "x is quantized to int8 per 32-input block on the fly (act_steps=2: plus its residual, "
          "~14-bit activations). int8: scales float16 [N, Kp/G], mins and row_scale None. "
          "int4/int3, either encoding (per matrix): f16: scales and mins float16 [N, Kp/G], "
          "row_scale None; codes: scales uint8 [N, Kp/G] (scale codes), mins int8 [N, Kp/G] (min codes), "
          "row_scale float32 [N]: s = row_scale * scale_table()[code], m = (s * min code) * 0.125. "
          "int8 may take code_sums int16 [N, Kp/32], each 32-code block's sum "
          "(runtime.quant.formats.block_code_sums): the batched kernel then skips a pass over "
          "the codes (they must be the true sums). Writes into `out` if given. prefetch (k, v, ranges): "
          "memory the caller reads next (ranges int64 [n, 2] of byte offset and length, each in both "
          "arrays), which the batched kernels bring into L2 under the products; results are the same.");
    m.def("qlinear_parts", &qlinear_parts, py::arg("x"), py::arg("parts"), py::arg("out") = py::none(),
          py::arg("prefetch") = py::none(),
          "y[M, sum N] = x[M,K] @ [W_0; W_1; ...].T for quantized matrices of any formats with the same K, "
          "each part a tuple (bits, group_size, q, qh, scales, mins, row_scale, act_steps, code_sums) of "
          "qlinear's arguments (the same act_steps for all): the same results as qlinear per part, side by "
          "side. One activation row is quantized once and every part's rows run in one parallel pass. "
          "prefetch as in qlinear (with the first part for several rows).");
    py::class_<DecoderStack>(m, "DecoderStack",
                             "A model's decoder layers, checked once and run in one call (csrc/decoder.h).")
        .def(py::init<py::ssize_t, py::ssize_t, py::ssize_t, py::ssize_t, py::ssize_t, double, const py::sequence&>(),
             py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("ffn"),
             py::arg("eps"), py::arg("layers"))
        .def_property_readonly("num_layers", &DecoderStack::num_layers)
        .def("forward", &DecoderStack::forward, py::arg("x"), py::arg("positions"), py::arg("cos"), py::arg("sin"),
             py::arg("interleaved"), py::arg("scale"), py::arg("k_caches"), py::arg("v_caches"),
             py::arg("block_table"), py::arg("seq_ids"), py::arg("ranges"),
             "x [T, hidden] += every layer in place: runtime.model's layer_loop with the same kernels "
             "and the same floats.");
    m.def("scale_table", [] {
        py::array_t<float> t(256);
        float* p = t.mutable_data();
        for (int c = 0; c < 256; ++c) p[c] = lingli::scale_factor(static_cast<uint8_t>(c));
        return t;
    }, "T[c] (float32 [256]) of the int4/int3 scale codes: s = row_scale * T[c].");
    m.def("qlinear_path", [] { return std::string(lingli::qgemm_path()); },
          "The quantized kernel the current ISA selects: avx512_vnni, avx2, neon_dot, neon or plain.");

    m.def("set_num_threads", [](int n) {
        if (n < 1) fail("set_num_threads: n must be >= 1, got " + std::to_string(n));
        lingli::set_num_threads(n);
    }, py::arg("n"));
    m.def("get_num_threads", &lingli::num_threads);
    m.def("isa", [] { return std::string(lingli::isa_name(lingli::current_isa())); },
          "The SIMD path in use: avx512, avx2, neon or plain.");
    m.def("set_isa", [](const std::string& name) { lingli::set_isa(parse_isa(name, "set_isa")); },
          py::arg("name"));
    m.def("available_isas", &available_isa_names);
    m.def("read_bandwidth", [](int64_t nbytes, int repeats) {
        if (nbytes < 64) fail("read_bandwidth: nbytes must be >= 64, got " + std::to_string(nbytes));
        if (repeats < 1) fail("read_bandwidth: repeats must be >= 1, got " + std::to_string(repeats));
        py::gil_scoped_release nogil;
        return lingli::read_bandwidth(nbytes, repeats);
    }, py::arg("nbytes") = int64_t(512) << 20, py::arg("repeats") = 5,
       "Best-of-`repeats` threaded read bandwidth over `nbytes` of floats, in GB/s.");
    m.def("vnni_peak", [](int threads) {
        if (threads < 1) fail("vnni_peak: threads must be >= 1, got " + std::to_string(threads));
        py::gil_scoped_release nogil;
        return lingli::vnni_peak(threads);
    }, py::arg("threads"),
       "int8 dot-product rate (AVX-512 VNNI) of `threads` threads together, in GOP/s; 0.0 without VNNI.");
}
