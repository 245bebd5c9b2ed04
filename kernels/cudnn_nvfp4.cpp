// cuDNN graphs behind a small C API: the `cudnn` NVFP4 variant (block-scale dequantize of the FP4
// weight with its 128x4-reordered E4M3 scales, matmul with bf16 activations in f32, multiply by a
// device scalar alpha) and fused scaled-dot-product attention (cuDNN's flash-attention engine: the
// score matrix is never materialized). Built graphs are cached per shape; every failure returns a
// message instead of aborting.
//
// Compiled by build.rs only with `--features cudnn` (needs cudnn-frontend and cuDNN headers).

#include <cudnn_frontend.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace fe = cudnn_frontend;

namespace {

// cuDNN reorders scales in tiles of 128 rows (N) by 4 columns (K blocks).
constexpr int64_t kTileN = 128, kTileK = 4, kGroup = 16;

struct Key {
    int device;
    int64_t m, n, k, row_elems;
    int linear_scales, out;
    bool operator<(const Key& o) const {
        return std::tie(device, m, n, k, row_elems, linear_scales, out) <
               std::tie(o.device, o.m, o.n, o.k, o.row_elems, o.linear_scales, o.out);
    }
};

struct Plan {
    std::shared_ptr<fe::graph::Graph> graph;
    std::shared_ptr<fe::graph::Tensor_attributes> x, w, ws, alpha, y;
    int64_t workspace = 0;
};

// Fused attention over [B, H, S, D] views with arbitrary strides (Q, K, V, O).
struct SdpaKey {
    int device;
    int64_t b, h, sq, sk, d;
    std::array<int64_t, 16> strides;  // q, k, v, o: 4 each
    int half;                         // 0 = bf16, 1 = f16, 2 = E4M3 (FP8 attention)
    uint32_t scale_bits;
    bool operator<(const SdpaKey& o) const {
        return std::tie(device, b, h, sq, sk, d, strides, half, scale_bits) <
               std::tie(o.device, o.b, o.h, o.sq, o.sk, o.d, o.strides, o.half, o.scale_bits);
    }
};

struct SdpaPlan {
    std::shared_ptr<fe::graph::Graph> graph;
    std::shared_ptr<fe::graph::Tensor_attributes> q, k, v, o;
    // FP8 only: descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, amax_s, amax_o.
    std::array<std::shared_ptr<fe::graph::Tensor_attributes>, 8> scalars;
    int64_t workspace = 0;
};

// Floats between two scalars of the FP8 attention's scalar buffer (ATTN_SLOT_FLOATS on the Rust
// side), and the slot of each graph scalar (descale_q .. amax_o) in it.
constexpr int64_t kSlotFloats = 4;
constexpr int kFp8ScalarSlots[8] = {3, 4, 5, 6, 7, 8, 9, 10};

struct State {
    std::mutex mu;
    std::map<int, cudnnHandle_t> handles;
    std::map<Key, Plan> plans;
    std::map<SdpaKey, SdpaPlan> sdpa_plans;
    std::map<int, std::pair<void*, int64_t>> workspaces;
};

State& state() {
    static State* s = new State();  // never destroyed: outlives every caller, including at exit
    return *s;
}

void set_err(char* err, size_t len, const std::string& msg) {
    if (err && len) {
        std::snprintf(err, len, "%s", msg.c_str());
    }
}

fe::DataType_t out_type(int out) {
    switch (out) {
        case 0: return fe::DataType_t::FLOAT;
        case 1: return fe::DataType_t::BFLOAT16;
        default: return fe::DataType_t::HALF;
    }
}

// Validates and compiles a graph (heuristics' first choice); `what` names it in the error message.
int compile_graph(fe::graph::Graph& g, cudnnHandle_t handle, const std::string& what, int64_t* workspace, char* err,
                  size_t errlen) {
    auto check = [&](fe::error_t e, const char* step) -> bool {
        if (e.is_good()) return true;
        set_err(err, errlen,
                std::string("cuDNN ") + std::to_string(cudnnGetVersion()) + " cannot " + step + " " + what + ": " +
                    e.get_message());
        return false;
    };
    if (!check(g.validate(), "validate")) return 1;
    if (!check(g.build_operation_graph(handle), "build")) return 1;
    if (!check(g.create_execution_plans({fe::HeurMode_t::A}), "find engines for")) return 1;
    if (!check(g.check_support(), "support")) return 1;
    if (!check(g.build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "compile")) return 1;
    if (!check(g.get_workspace_size(*workspace), "size the workspace of")) return 1;
    return 0;
}

// Builds (or finds) the plan; caller holds the lock.
int get_plan(const Key& key, cudnnHandle_t handle, Plan** out, char* err, size_t errlen) {
    State& s = state();
    auto it = s.plans.find(key);
    if (it != s.plans.end()) {
        *out = &it->second;
        return 0;
    }
    const int64_t m = key.m, n = key.n, k = key.k;
    const int64_t sk = (k / kGroup + kTileK - 1) / kTileK * kTileK;
    const int64_t sn = (n + kTileN - 1) / kTileN * kTileN;
    Plan p;
    p.graph = std::make_shared<fe::graph::Graph>();
    auto& g = *p.graph;
    g.set_intermediate_data_type(fe::DataType_t::FLOAT).set_compute_data_type(fe::DataType_t::FLOAT);
    p.x = g.tensor(fe::graph::Tensor_attributes()
                       .set_name("x")
                       .set_data_type(fe::DataType_t::BFLOAT16)
                       .set_dim({1, m, k})
                       .set_stride({m * k, k, 1}));
    // Weight rows are N, each `row_elems` codes long (K padded to 32): a K-major [K, N] operand.
    p.w = g.tensor(fe::graph::Tensor_attributes()
                       .set_name("w")
                       .set_data_type(fe::DataType_t::FP4_E2M1)
                       .set_dim({1, k, n})
                       .set_stride({key.row_elems * n, 1, key.row_elems}));
    auto ws = fe::graph::Tensor_attributes().set_name("w_scale").set_data_type(fe::DataType_t::FP8_E4M3);
    if (key.linear_scales) {
        // [N, K/16] row-major: what cuDNN's engines take on GPUs without FP4 tensor cores.
        const int64_t kb = k / kGroup;
        ws.set_dim({1, kb, n}).set_stride({kb * n, 1, kb});
    } else {
        ws.set_dim({1, sk, sn}).set_stride({sk * sn, 1, sk}).set_reordering_type(fe::TensorReordering_t::F8_128x4);
    }
    p.ws = g.tensor(ws);
    p.alpha = g.tensor(fe::graph::Tensor_attributes()
                           .set_name("alpha")
                           .set_data_type(fe::DataType_t::FLOAT)
                           .set_dim({1, 1, 1})
                           .set_stride({1, 1, 1}));
    auto deq = g.block_scale_dequantize(p.w, p.ws, fe::graph::Block_scale_dequantize_attributes().set_block_size({kGroup, 1}));
    // Without an explicit type the dequantized operand stays f32 and cuDNN picks f32 math.
    deq->set_data_type(fe::DataType_t::BFLOAT16);
    auto mm = g.matmul(p.x, deq, fe::graph::Matmul_attributes().set_name("gemm").set_compute_data_type(fe::DataType_t::FLOAT));
    mm->set_data_type(fe::DataType_t::FLOAT);
    p.y = g.pointwise(mm, p.alpha, fe::graph::Pointwise_attributes().set_mode(fe::PointwiseMode_t::MUL).set_compute_data_type(fe::DataType_t::FLOAT));
    p.y->set_output(true).set_data_type(out_type(key.out));

    const std::string what = "the NVFP4 dequantize+matmul graph (M=" + std::to_string(m) + ", N=" + std::to_string(n) +
                             ", K=" + std::to_string(k) + ")";
    if (compile_graph(g, handle, what, &p.workspace, err, errlen)) return 1;
    auto ins = s.plans.emplace(key, std::move(p));
    *out = &ins.first->second;
    return 0;
}

int handle_for(int device, cudaStream_t stream, cudnnHandle_t* h, char* err, size_t errlen) {
    State& s = state();
    auto it = s.handles.find(device);
    if (it == s.handles.end()) {
        cudnnHandle_t handle;
        cudnnStatus_t st = cudnnCreate(&handle);
        if (st != CUDNN_STATUS_SUCCESS) {
            set_err(err, errlen, std::string("cudnnCreate failed: ") + cudnnGetErrorString(st));
            return 1;
        }
        it = s.handles.emplace(device, handle).first;
    }
    cudnnSetStream(it->second, stream);
    *h = it->second;
    return 0;
}

int ensure_workspace(int device, int64_t bytes, void** out, char* err, size_t errlen) {
    auto& ws = state().workspaces[device];
    if (ws.second < bytes) {
        if (ws.first) cudaFree(ws.first);
        if (cudaMalloc(&ws.first, bytes) != cudaSuccess) {
            ws = {nullptr, 0};
            set_err(err, errlen, "cudaMalloc of the cuDNN workspace failed");
            return 1;
        }
        ws.second = bytes;
    }
    *out = ws.first;
    return 0;
}

int get_sdpa_plan(const SdpaKey& key, float scale, cudnnHandle_t handle, SdpaPlan** out, char* err, size_t errlen) {
    State& s = state();
    auto it = s.sdpa_plans.find(key);
    if (it != s.sdpa_plans.end()) {
        *out = &it->second;
        return 0;
    }
    const bool fp8 = key.half == 2;
    const auto io = fp8 ? fe::DataType_t::FP8_E4M3 : key.half ? fe::DataType_t::HALF : fe::DataType_t::BFLOAT16;
    SdpaPlan p;
    p.graph = std::make_shared<fe::graph::Graph>();
    auto& g = *p.graph;
    g.set_io_data_type(io).set_intermediate_data_type(fe::DataType_t::FLOAT).set_compute_data_type(fe::DataType_t::FLOAT);
    auto view = [&](const char* name, int64_t seq, int at) {
        const auto& st = key.strides;
        return g.tensor(fe::graph::Tensor_attributes()
                            .set_name(name)
                            .set_dim({key.b, key.h, seq, key.d})
                            .set_stride({st[at], st[at + 1], st[at + 2], st[at + 3]}));
    };
    p.q = view("Q", key.sq, 0);
    p.k = view("K", key.sk, 4);
    p.v = view("V", key.sk, 8);
    auto opts = fe::graph::SDPA_attributes().set_name("sdpa").set_generate_stats(false).set_attn_scale(scale);
    if (fp8) {
        auto scalar = [&](const char* name) {
            return g.tensor(fe::graph::Tensor_attributes()
                                .set_name(name)
                                .set_dim({1, 1, 1, 1})
                                .set_stride({1, 1, 1, 1})
                                .set_data_type(fe::DataType_t::FLOAT));
        };
        auto& sc = p.scalars;
        sc[0] = scalar("descale_q");
        sc[1] = scalar("descale_k");
        sc[2] = scalar("descale_v");
        sc[3] = scalar("descale_s");
        sc[4] = scalar("scale_s");
        sc[5] = scalar("scale_o");
        auto outs = g.sdpa_fp8(p.q, p.k, p.v, sc[0], sc[1], sc[2], sc[3], sc[4], sc[5], opts);
        p.o = outs[0];
        sc[6] = outs[2];
        sc[7] = outs[3];
        for (int i = 6; i < 8; i++)
            sc[i]->set_output(true).set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1}).set_data_type(fe::DataType_t::FLOAT);
        p.o->set_data_type(fe::DataType_t::FP8_E4M3);
    } else {
        p.o = g.sdpa(p.q, p.k, p.v, opts)[0];
    }
    const auto& st = key.strides;
    p.o->set_output(true).set_dim({key.b, key.h, key.sq, key.d}).set_stride({st[12], st[13], st[14], st[15]});
    const std::string what = std::string(fp8 ? "the FP8 fused attention graph (B=" : "the fused attention graph (B=") + std::to_string(key.b) + ", H=" + std::to_string(key.h) +
                             ", Sq=" + std::to_string(key.sq) + ", Sk=" + std::to_string(key.sk) +
                             ", D=" + std::to_string(key.d) +
                             (fp8 ? "; --attention cudnn selects the bf16 fused attention)"
                                  : "; CANDIFF_ATTENTION=reference selects the unfused attention)");
    if (compile_graph(g, handle, what, &p.workspace, err, errlen)) return 1;
    auto ins = s.sdpa_plans.emplace(key, std::move(p));
    *out = &ins.first->second;
    return 0;
}

}  // namespace

extern "C" {

// o = softmax(scale * q k^T) v over [B, H, S, D] views; strides = q, k, v, o (4 each, elements);
// half: 0 bf16, 1 f16, 2 E4M3 (then `scalars` is the FP8 scalar buffer, see kFp8ScalarSlots).
int candiff_cudnn_sdpa(int device, void* stream, int64_t b, int64_t h, int64_t sq, int64_t sk, int64_t d,
                       const int64_t* strides, int half, float scale, const void* q, const void* k, const void* v,
                       void* o, float* scalars, char* err, size_t errlen) {
    std::lock_guard<std::mutex> lock(state().mu);
    cudnnHandle_t hd;
    if (handle_for(device, (cudaStream_t)stream, &hd, err, errlen)) return 1;
    SdpaKey key{device, b, h, sq, sk, d, {}, half, 0};
    std::memcpy(key.strides.data(), strides, sizeof(int64_t) * 16);
    std::memcpy(&key.scale_bits, &scale, sizeof(float));
    SdpaPlan* p;
    if (get_sdpa_plan(key, scale, hd, &p, err, errlen)) return 1;
    void* ws;
    if (ensure_workspace(device, p->workspace, &ws, err, errlen)) return 1;
    std::unordered_map<std::shared_ptr<fe::graph::Tensor_attributes>, void*> pack = {
        {p->q, const_cast<void*>(q)}, {p->k, const_cast<void*>(k)}, {p->v, const_cast<void*>(v)}, {p->o, o}};
    if (half == 2) {
        if (!scalars) {
            set_err(err, errlen, "FP8 attention needs its scalar buffer");
            return 1;
        }
        for (int i = 0; i < 8; i++) pack[p->scalars[i]] = scalars + kSlotFloats * kFp8ScalarSlots[i];
    }
    auto e = p->graph->execute(hd, pack, ws);
    if (!e.is_good()) {
        set_err(err, errlen, std::string("cuDNN fused attention failed: ") + e.get_message());
        return 1;
    }
    return 0;
}

size_t candiff_cudnn_version() { return cudnnGetVersion(); }

// Builds the graph for this shape now (so an unsupported GPU / cuDNN fails at load time).
int candiff_cudnn_nvfp4_prepare(int device, void* stream, int64_t m, int64_t n, int64_t k, int64_t row_elems,
                                int linear_scales, int out, char* err, size_t errlen) {
    std::lock_guard<std::mutex> lock(state().mu);
    cudnnHandle_t h;
    if (handle_for(device, (cudaStream_t)stream, &h, err, errlen)) return 1;
    Plan* p;
    return get_plan(Key{device, m, n, k, row_elems, linear_scales, out}, h, &p, err, errlen);
}

// y[m, n] = alpha * x[m, k] . dequant(w)[k, n]; alpha is a device f32 scalar.
int candiff_cudnn_nvfp4_matmul(int device, void* stream, int64_t m, int64_t n, int64_t k, int64_t row_elems,
                               int linear_scales, int out, const void* x, const void* w, const void* w_scale, const void* alpha, void* y,
                               char* err, size_t errlen) {
    std::lock_guard<std::mutex> lock(state().mu);
    cudnnHandle_t h;
    if (handle_for(device, (cudaStream_t)stream, &h, err, errlen)) return 1;
    Plan* p;
    if (get_plan(Key{device, m, n, k, row_elems, linear_scales, out}, h, &p, err, errlen)) return 1;
    void* ws;
    if (ensure_workspace(device, p->workspace, &ws, err, errlen)) return 1;
    std::unordered_map<std::shared_ptr<fe::graph::Tensor_attributes>, void*> pack = {
        {p->x, const_cast<void*>(x)},       {p->w, const_cast<void*>(w)}, {p->ws, const_cast<void*>(w_scale)},
        {p->alpha, const_cast<void*>(alpha)}, {p->y, y}};
    auto e = p->graph->execute(h, pack, ws);
    if (!e.is_good()) {
        set_err(err, errlen, std::string("cuDNN NVFP4 matmul failed: ") + e.get_message());
        return 1;
    }
    return 0;
}

}  // extern "C"
