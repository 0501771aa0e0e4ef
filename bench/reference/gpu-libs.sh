# Sourced by the GPU scripts here: puts the image's CUDA user-space libraries (torch's wheels:
# cublas(Lt), curand, cudart, nvrtc) on LD_LIBRARY_PATH for a CUDA build of road.
LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ("libcublasLt.so.*", "libcublas.so.*", "libcurand.so.*", "libcudart.so.*", "libnvrtc.so.*"):
        for f in glob.glob(f"{sp}/nvidia/**/{pat}", recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${LIBS}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
