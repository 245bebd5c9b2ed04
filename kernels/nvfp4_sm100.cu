// The `cutlass` variant's w4a4 path on Blackwell datacenter GPUs (sm_100a): CUTLASS's block-scaled
// NVFP4 x NVFP4 GEMM on FP4 tensor cores, D = alpha * A . B^T with A the quantized activations
// (row-major, 128x4 scales) and B the prepared weight (N x K K-major, 128x4 scales).
//
// UNTESTED: it compiles here, but no Blackwell GPU has run it yet. Built only for sm_100a, only with
// the CUTLASS headers; called only when the device reports compute capability 10.0.

#include <cstdio>
#include <string>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

using namespace cute;

namespace {

template <class ElementD>
struct Fp4Gemm {
    using ElementA = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
    using ElementB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
    using LayoutA = cutlass::layout::RowMajor;
    using LayoutB = cutlass::layout::ColumnMajor;
    using LayoutD = cutlass::layout::RowMajor;
    static constexpr int kAlignAB = 32;  // elements: 16 bytes of E2M1
    static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
    using Tile = Shape<_128, _128, _256>;
    using Cluster = Shape<_1, _1, _1>;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, Tile, Cluster,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignD, ElementD, LayoutD,
        kAlignD, cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, ElementA, LayoutA, kAlignAB, ElementB,
        LayoutB, kAlignAB, float, Tile, Cluster,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, void>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    static int run(const void* a, const void* sfa, const void* b, const void* sfb, void* d, int m, int n, int k,
                   float alpha, cudaStream_t stream, char* err, size_t errlen) {
        using Cfg = typename Kernel::CollectiveMainloop::Sm1xxBlkScaledConfig;
        typename Kernel::StrideA sa{};
        typename Kernel::StrideB sb{};
        typename Kernel::StrideD sd{};
        // Packed strides: A is M x K row-major, B is N x K (K contiguous), D is M x N row-major.
        get<0>(sa) = k;
        get<2>(sa) = (int64_t)m * k;
        get<0>(sb) = k;
        get<2>(sb) = (int64_t)n * k;
        get<0>(sd) = n;
        get<2>(sd) = (int64_t)m * n;
        auto lsfa = Cfg::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
        auto lsfb = Cfg::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));
        typename Gemm::Arguments args{
            cutlass::gemm::GemmUniversalMode::kGemm,
            {m, n, k, 1},
            {static_cast<const typename ElementA::DataType*>(a), sa,
             static_cast<const typename ElementB::DataType*>(b), sb,
             static_cast<const typename ElementA::ScaleFactorType*>(sfa), lsfa,
             static_cast<const typename ElementB::ScaleFactorType*>(sfb), lsfb},
            {{alpha, 0.0f}, nullptr, sd, static_cast<ElementD*>(d), sd}};
        Gemm gemm;
        auto fail = [&](const char* what, cutlass::Status s) {
            std::snprintf(err, errlen, "CUTLASS sm100 NVFP4 GEMM (M=%d N=%d K=%d): %s: %s", m, n, k, what,
                          cutlassGetStatusString(s));
            return 1;
        };
        cutlass::Status s = gemm.can_implement(args);
        if (s != cutlass::Status::kSuccess) return fail("cannot implement", s);
        size_t ws = Gemm::get_workspace_size(args);
        void* workspace = nullptr;
        if (ws > 0 && cudaMallocAsync(&workspace, ws, stream) != cudaSuccess) {
            std::snprintf(err, errlen, "CUTLASS sm100 NVFP4 GEMM: workspace allocation of %zu bytes failed", ws);
            return 1;
        }
        s = gemm.initialize(args, workspace, stream);
        if (s == cutlass::Status::kSuccess) s = gemm.run(stream);
        if (workspace) cudaFreeAsync(workspace, stream);
        if (s != cutlass::Status::kSuccess) return fail("run", s);
        return 0;
    }
};

}  // namespace

extern "C" int candiff_sm100_nvfp4_gemm(const void* a, const void* sfa, const void* b, const void* sfb, void* d,
                                        int m, int n, int k, float alpha, int out_f32, void* stream, char* err,
                                        size_t errlen) {
#if defined(CUTLASS_ARCH_MMA_SM100_SUPPORTED)
    if (out_f32)
        return Fp4Gemm<float>::run(a, sfa, b, sfb, d, m, n, k, alpha, (cudaStream_t)stream, err, errlen);
    return Fp4Gemm<cutlass::bfloat16_t>::run(a, sfa, b, sfb, d, m, n, k, alpha, (cudaStream_t)stream, err, errlen);
#else
    std::snprintf(err, errlen, "this build has no sm_100a code for the CUTLASS NVFP4 GEMM");
    return 1;
#endif
}
