"""A CUDA-like vLLM platform for the CPU harness (a stand-in for detection).

vLLM 0.8.5 detects CUDA through NVML; without a GPU it would pick no
platform, call attention directly (no custom op) and fall back to Marlin for
FP8.  This platform is vLLM's own ``CudaPlatformBase`` with a fixed device:
an sm_90 GPU.  It is selected only when the harness is active.
"""
import torch
from vllm.distributed.device_communicators.base_device_communicator import (
    DeviceCommunicatorBase)
from vllm.platforms.cuda import CudaPlatformBase
from vllm.platforms.interface import DeviceCapability


class HarnessPlatform(CudaPlatformBase):

    # The harness's tensors live on the CPU: vLLM registers its custom ops
    # (the attention ops among them) for this dispatch key.
    dispatch_key = "CPU"

    @classmethod
    def get_device_capability(cls, device_id: int = 0):
        return DeviceCapability(major=9, minor=0)

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "cpu-harness (stands in for an sm_90 GPU)"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return 80 << 30

    @classmethod
    def is_fully_connected(cls, physical_device_ids) -> bool:
        return True

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        # gloo only: vLLM's CUDA communicator would open NCCL on a device.
        return "cpu_harness.platform.GlooCommunicator"


class GlooCommunicator(DeviceCommunicatorBase):
    """vLLM's base (gloo) communicator with an out-of-place all-reduce.

    ``vllm::all_reduce`` is registered as returning a new tensor, but the
    base class reduces its input in place and returns it: in a compiled
    graph Inductor may still read that input (the residual), which then
    holds the sum.  vLLM's CUDA communicators reduce out of place."""

    def all_reduce(self, input_):
        out = input_.clone()
        torch.distributed.all_reduce(out, group=self.device_group)
        return out
