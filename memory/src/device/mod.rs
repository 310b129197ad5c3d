//! The device tier's backends. The simulated device is host memory (see `host.rs`) paced by the
//! copy lanes; the CUDA device is here.

pub(crate) mod cuda;

pub use cuda::CudaInfo;
