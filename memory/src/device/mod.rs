//! The device tier's backends. The simulated device is host memory (see `host.rs`) paced by the
//! copy lanes; the CUDA device is here.

pub(crate) mod cuda;

pub use cuda::CudaInfo;

/// Free and total bytes of GPU `ordinal` as the driver reports them (`Error::NoCuda`, with the
/// reason, where there is none).
pub fn cuda_memory(ordinal: usize) -> crate::Result<(u64, u64)> {
    cuda::Cuda::probe(ordinal)?.mem_info()
}
