"""epmoe — Python package over libepmoe (the C library is the whole implementation).

    import epmoe
    q, s = epmoe.cast_group_fp8(x_bf16)                  # numpy, torch, any DLPack tensor; no copies
    with epmoe.CpuWorld(2) as world:                    # EP ranks as threads (the CPU backend)
        outs = world.run(lambda g: step(g), epmoe.EpConfig(max_tokens=16, hidden=256, num_experts=8, top_k=2))
    g = epmoe.nccl.create_group(cfg)                    # GPUs, next to torch.distributed

Modules: `formats` (fp8/bf16/UE8M0/int4, quant ops), `w4a8` (weight repack, the W4A8 expert GEMM
and MLP), `experts` (the bf16, fp8-block and int4 weights of the other schemes, their expert GEMM and MLP), `ep` (EpConfig, CpuWorld, EpGroup), `layer` (the MoE layer on an EP group: EpGroup.layer,
its forward whole or in phases, layer_ref),
`nccl` (communicators from torch.distributed), `deep_ep` (DeepEP's low-latency Buffer API on
an EP group), `dlpack` (the DLPack bridge). Failed calls raise
epmoe.Error subclasses carrying the library's message (epmoe_last_error()).

The library is found through $EPMOE_LIB, next to this package (installed wheels), or in the
repository's build/ folder.
"""
from . import dlpack
from ._lib import (LIBRARY_PATH, CudaError, Error, InternalError, InvalidArgument, Misaligned, NcclError, NullPointer,
                   OutOfMemory, Timeout, Unsupported, check, find_library, lib)
from .dlpack import DLPackError, Tensor, as_tensor, dtype, from_dlpack
from .ep import (REDUCE_AT_EXPERT, REDUCE_AT_OWNER, WIRE_BF16, WIRE_FP8, CpuWorld, Dispatch, EpConfig, EpGroup,
                 EpLayout, combine_ref, dispatch_ref, layout_query)
from .formats import (BF16, F32, FP8_E4M3, FP8_E4M3_MAX, GROUP, SCALE_F32_MMAJOR, SCALE_F32_ROW, SCALE_UE8M0_MMAJOR,
                      SCALE_UE8M0_ROW, bf16_from_float, bf16_to_float, cast_group_fp8, cast_tensor_fp8,
                      cuda_available, dequant_fp8, fp8_from_float, fp8_to_float, int4_pack, int4_unpack,
                      requant_fp8, scale_bytes, scale_dtypes, scale_offset, scale_shape, ue8m0_from_float,
                      ue8m0_to_float)
from . import w4a8  # noqa: E402
from .w4a8 import W4A8Weights  # noqa: E402
from . import experts  # noqa: E402
from .experts import ExpertWeights  # noqa: E402
from .layer import (LAYER_ALL, LAYER_EXPERTS, LAYER_RECV, LAYER_SEND, Layer, LayerForward, layer_ref,  # noqa: E402
                    expected_rows, scheme_accepts_wire, scheme_default_wire)
from . import layer  # noqa: E402
from . import nccl  # noqa: E402  (imports torch only when its functions are called)
from . import deep_ep  # noqa: E402  (DeepEP's low-latency Buffer on epmoe)

__version__ = lib.epmoe_version_string().decode()


def version():
    """The version of the loaded libepmoe ("major.minor.patch")."""
    return __version__


__all__ = [
    "lib", "LIBRARY_PATH", "find_library", "version", "__version__", "check",
    "Error", "InvalidArgument", "NullPointer", "Misaligned", "Unsupported", "OutOfMemory", "CudaError", "NcclError",
    "Timeout", "InternalError", "DLPackError",
    "Tensor", "from_dlpack", "as_tensor", "dtype", "dlpack",
    "SCALE_F32_ROW", "SCALE_F32_MMAJOR", "SCALE_UE8M0_ROW", "SCALE_UE8M0_MMAJOR", "F32", "BF16", "FP8_E4M3", "GROUP",
    "FP8_E4M3_MAX", "cuda_available", "fp8_from_float", "fp8_to_float", "bf16_from_float", "bf16_to_float",
    "ue8m0_from_float", "ue8m0_to_float", "int4_pack", "int4_unpack", "scale_bytes", "scale_offset", "scale_shape",
    "scale_dtypes",
    "cast_group_fp8", "cast_tensor_fp8", "requant_fp8", "dequant_fp8",
    "EpConfig", "EpLayout", "EpGroup", "Dispatch", "CpuWorld", "layout_query", "dispatch_ref", "combine_ref",
    "WIRE_BF16", "WIRE_FP8", "REDUCE_AT_OWNER", "REDUCE_AT_EXPERT", "nccl", "deep_ep",
    "w4a8", "W4A8Weights", "experts", "ExpertWeights", "layer", "Layer", "layer_ref", "scheme_default_wire", "scheme_accepts_wire",
    "expected_rows",
    "LayerForward", "LAYER_SEND", "LAYER_EXPERTS", "LAYER_RECV", "LAYER_ALL",
]
