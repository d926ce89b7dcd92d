//! cuSOLVER SVD (gesvdj, f32) for `t2 decompose-bench --device cuda`.
//!
//! libcusolver is opened at run time (dlopen) rather than linked: candle links the CUDA libraries it uses
//! at build time, and enabling cudarc's `cusolver` feature would make every cuda build need libcusolver
//! on the build machine. Here only this command needs it, and where it is missing it says so.

#[cfg(not(feature = "cuda"))]
use anyhow::Result;

/// Seconds for one thin SVD of a random row-major (out × in) matrix on GPU `ordinal` (upload excluded,
/// factors' download excluded), and the relative reconstruction error of the f32 factors (checked on the
/// host in f64).
#[cfg(not(feature = "cuda"))]
pub fn time_svd(_ordinal: usize, _data: &[f32], _out: usize, _inp: usize) -> Result<(f64, f64)> {
    anyhow::bail!(
        "--device cuda needs a binary built with the cuda feature (cargo build --release --features cuda)"
    )
}

/// Fails clearly, before any work, where the GPU path cannot run.
#[cfg(not(feature = "cuda"))]
pub fn probe(_ordinal: usize) -> Result<()> {
    time_svd(0, &[], 0, 0).map(|_| ())
}

#[cfg(feature = "cuda")]
pub use imp::{probe, time_svd};

#[cfg(feature = "cuda")]
mod imp {
    use std::ffi::{c_int, c_void};
    use std::time::Instant;

    use anyhow::{anyhow, bail, Context, Result};
    use candle_core::cuda_backend::cudarc::driver::{CudaContext, DevicePtrMut};

    type Handle = *mut c_void;
    type Info = *mut c_void;
    type Status = c_int;
    /// CUSOLVER_EIG_MODE_VECTOR
    const WANT_VECTORS: c_int = 1;

    type CreateFn = unsafe extern "C" fn(*mut Handle) -> Status;
    type DestroyFn = unsafe extern "C" fn(Handle) -> Status;
    type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> Status;
    type CreateInfoFn = unsafe extern "C" fn(*mut Info) -> Status;
    type DestroyInfoFn = unsafe extern "C" fn(Info) -> Status;
    #[allow(clippy::type_complexity)]
    type BufferSizeFn = unsafe extern "C" fn(
        Handle,
        c_int,
        c_int,
        c_int,
        c_int,
        *const f32,
        c_int,
        *const f32,
        *const f32,
        c_int,
        *const f32,
        c_int,
        *mut c_int,
        Info,
    ) -> Status;
    #[allow(clippy::type_complexity)]
    type GesvdjFn = unsafe extern "C" fn(
        Handle,
        c_int,
        c_int,
        c_int,
        c_int,
        *mut f32,
        c_int,
        *mut f32,
        *mut f32,
        c_int,
        *mut f32,
        c_int,
        *mut f32,
        c_int,
        *mut c_int,
        Info,
    ) -> Status;

    const LIBS: [&str; 3] = ["libcusolver.so", "libcusolver.so.12", "libcusolver.so.11"];

    fn open() -> Result<libloading::Library> {
        let mut errors = Vec::new();
        for name in LIBS {
            // SAFETY: loading a vendor library whose initialisers have no preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Ok(lib),
                Err(e) => errors.push(e.to_string()),
            }
        }
        bail!(
            "cannot load cuSOLVER ({}): put the CUDA libraries on LD_LIBRARY_PATH (e.g. run through with-gpu-libs.sh)",
            errors.join("; ")
        )
    }

    fn check(what: &str, status: Status) -> Result<()> {
        if status != 0 {
            bail!("{what} failed with cuSOLVER status {status}");
        }
        Ok(())
    }

    pub fn probe(ordinal: usize) -> Result<()> {
        context(ordinal)?;
        open().map(|_| ())
    }

    fn context(ordinal: usize) -> Result<std::sync::Arc<CudaContext>> {
        CudaContext::new(ordinal).map_err(|e| {
            anyhow!("no CUDA device {ordinal} ({e:?}): --device cuda needs an NVIDIA GPU and its driver")
        })
    }

    pub fn time_svd(ordinal: usize, data: &[f32], out: usize, inp: usize) -> Result<(f64, f64)> {
        let ctx = context(ordinal)?;
        let stream = ctx.default_stream();
        let lib = open()?;
        // SAFETY: the symbols have the signatures of cusolverDn.h (CUDA 11–13).
        let sym = |name: &str| -> Result<*const c_void> {
            unsafe { lib.get::<*const c_void>(name.as_bytes()) }
                .map(|s| *s)
                .with_context(|| format!("libcusolver has no {name}"))
        };
        // SAFETY: each pointer is transmuted to the function type cusolverDn.h declares for that name.
        let (create, destroy, set_stream, create_info, destroy_info, buffer_size, gesvdj) = unsafe {
            (
                std::mem::transmute::<*const c_void, CreateFn>(sym("cusolverDnCreate")?),
                std::mem::transmute::<*const c_void, DestroyFn>(sym("cusolverDnDestroy")?),
                std::mem::transmute::<*const c_void, SetStreamFn>(sym("cusolverDnSetStream")?),
                std::mem::transmute::<*const c_void, CreateInfoFn>(sym(
                    "cusolverDnCreateGesvdjInfo",
                )?),
                std::mem::transmute::<*const c_void, DestroyInfoFn>(sym(
                    "cusolverDnDestroyGesvdjInfo",
                )?),
                std::mem::transmute::<*const c_void, BufferSizeFn>(sym(
                    "cusolverDnSgesvdj_bufferSize",
                )?),
                std::mem::transmute::<*const c_void, GesvdjFn>(sym("cusolverDnSgesvdj")?),
            )
        };
        // Row-major W (out × in) is column-major Wᵀ (in × out): SVD of Wᵀ = U'·Σ·V'ᵀ, so W = V'·Σ·U'ᵀ.
        let (m, n) = (inp, out);
        let r = m.min(n);
        let to_i =
            |x: usize| c_int::try_from(x).context("matrix too large for cuSOLVER's int sizes");
        let (mi, ni) = (to_i(m)?, to_i(n)?);
        let mut a = stream.clone_htod(data)?;
        let mut s = stream.alloc_zeros::<f32>(r)?;
        let mut u = stream.alloc_zeros::<f32>(m * r)?;
        let mut v = stream.alloc_zeros::<f32>(n * r)?;
        let mut info_dev = stream.alloc_zeros::<c_int>(1)?;
        let mut handle: Handle = std::ptr::null_mut();
        let mut params: Info = std::ptr::null_mut();
        // SAFETY: plain cuSOLVER calls on buffers of the sizes gesvdj documents (econ: U m×r, V n×r).
        let secs = unsafe {
            check("cusolverDnCreate", create(&mut handle))?;
            check(
                "cusolverDnSetStream",
                set_stream(handle, stream.cu_stream() as *mut c_void),
            )?;
            check("cusolverDnCreateGesvdjInfo", create_info(&mut params))?;
            let (pa, _ga) = a.device_ptr_mut(&stream);
            let (ps, _gs) = s.device_ptr_mut(&stream);
            let (pu, _gu) = u.device_ptr_mut(&stream);
            let (pv, _gv) = v.device_ptr_mut(&stream);
            let (pi, _gi) = info_dev.device_ptr_mut(&stream);
            let mut lwork: c_int = 0;
            check(
                "cusolverDnSgesvdj_bufferSize",
                buffer_size(
                    handle,
                    WANT_VECTORS,
                    1,
                    mi,
                    ni,
                    pa as *const f32,
                    mi,
                    ps as *const f32,
                    pu as *const f32,
                    mi,
                    pv as *const f32,
                    ni,
                    &mut lwork,
                    params,
                ),
            )?;
            let mut work = stream.alloc_zeros::<f32>(lwork.max(1) as usize)?;
            let (pw, _gw) = work.device_ptr_mut(&stream);
            stream.synchronize()?;
            let t0 = Instant::now();
            let st = gesvdj(
                handle,
                WANT_VECTORS,
                1,
                mi,
                ni,
                pa as *mut f32,
                mi,
                ps as *mut f32,
                pu as *mut f32,
                mi,
                pv as *mut f32,
                ni,
                pw as *mut f32,
                lwork,
                pi as *mut c_int,
                params,
            );
            stream.synchronize()?;
            let secs = t0.elapsed().as_secs_f64();
            check("cusolverDnSgesvdj", st)?;
            check("cusolverDnDestroyGesvdjInfo", destroy_info(params))?;
            check("cusolverDnDestroy", destroy(handle))?;
            secs
        };
        let info = stream.clone_dtoh(&info_dev)?;
        if info[0] != 0 {
            bail!(
                "cusolverDnSgesvdj reported info = {} for {out}x{inp}",
                info[0]
            );
        }
        // W's factors: U_W = V' (n × r, column-major = r × n row-major), Vᵀ_W = U'ᵀ (U' column-major m × r
        // is r × m row-major, which is Vᵀ_W).
        let (s_h, u_h, v_h) = (
            stream.clone_dtoh(&s)?,
            stream.clone_dtoh(&u)?,
            stream.clone_dtoh(&v)?,
        );
        let u_w: Vec<f32> = (0..out)
            .flat_map(|i| (0..r).map(move |j| (i, j)))
            .map(|(i, j)| v_h[j * n + i])
            .collect();
        let rel = t2_svf::decompose::reconstruction_error(
            |i, j| data[i * inp + j] as f64,
            out,
            inp,
            &u_w,
            &s_h,
            &u_h,
        );
        Ok((secs, rel))
    }
}
