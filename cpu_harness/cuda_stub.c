/*
 * A stand-in for the NVIDIA driver library (libcuda.so.1) on machines that
 * have no GPU, so that vLLM's CUDA-built extension `_C` loads and registers
 * its op schemas.  Every entry point answers CUDA_ERROR_NO_DEVICE: nothing
 * can run on it.  The harness refuses to load it where a real driver exists.
 *
 * Exported: the two driver symbols vLLM 0.8.5.post1's _C.abi3.so imports,
 * plus cuInit/cuDriverGetVersion/cuGetProcAddress so that a CUDA runtime that
 * probes this library sees "no device" instead of a missing symbol.
 */
typedef int CUresult;
#define CUDA_ERROR_NO_DEVICE 100

CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_ERROR_NO_DEVICE; }
CUresult cuDriverGetVersion(int *version) {
    if (version) *version = 0;
    return CUDA_ERROR_NO_DEVICE;
}
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version,
                          unsigned long long flags) {
    (void)symbol; (void)version; (void)flags;
    if (pfn) *pfn = 0;
    return CUDA_ERROR_NO_DEVICE;
}
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version,
                             unsigned long long flags, void *status) {
    (void)status;
    return cuGetProcAddress(symbol, pfn, version, flags);
}
CUresult cuPointerGetAttribute(void *data, int attribute, unsigned long long ptr) {
    (void)data; (void)attribute; (void)ptr;
    return CUDA_ERROR_NO_DEVICE;
}
CUresult cuTensorMapEncodeTiled(void *tensor_map, int dtype, unsigned int rank,
                                void *global_address, const void *global_dim,
                                const void *global_strides, const void *box_dim,
                                const void *element_strides, int interleave,
                                int swizzle, int l2_promotion, int oob_fill) {
    (void)tensor_map; (void)dtype; (void)rank; (void)global_address;
    (void)global_dim; (void)global_strides; (void)box_dim;
    (void)element_strides; (void)interleave; (void)swizzle;
    (void)l2_promotion; (void)oob_fill;
    return CUDA_ERROR_NO_DEVICE;
}
