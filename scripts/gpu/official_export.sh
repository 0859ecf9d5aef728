#!/usr/bin/env bash
# Export the official Infinity and HART inference code into the git-ignored .official/ (never committed), with our
# pure-torch stand-ins for what the device lacks, for scripts/gpu/official.py (docs/performance.md, "The official
# pipelines side by side"). Reads the git mirrors that the `fetch` tool makes:
#   scripts/gpu/official_export.sh [INFINITY_GIT_DIR [HART_GIT_DIR]]
# Defaults: /work/.mirror/FoundationVision+Infinity/repo and /work/.mirror/mit-han-lab+hart/repo.
# Writes .official/infinity (infinity/ and tools/run_infinity.py), .official/hart (hart/, no CUDA kernels),
# .official/shims (flash_attn on torch SDPA, hart_backend.fused_kernels in pure torch: put FIRST on sys.path) and
# .official/fallback (stand-ins for packages the device may lack: put LAST on sys.path, so real ones win).
set -euo pipefail
cd "$(dirname "$0")/../.."
infinity=${1:-/work/.mirror/FoundationVision+Infinity/repo}
hart=${2:-/work/.mirror/mit-han-lab+hart/repo}
for git_dir in "$infinity" "$hart"; do
    git --git-dir="$git_dir" rev-parse --verify -q HEAD >/dev/null \
        || { echo "official_export.sh: no git repository at $git_dir (fetch github:FoundationVision/Infinity and github:mit-han-lab/hart)" >&2; exit 2; }
done
rm -rf .official && mkdir -p .official/infinity .official/hart .official/shims/flash_attn/ops .official/shims/hart_backend .official/fallback
# Only the Python files inference imports (a few hundred KB): the device call's working tree is limited to 64 MiB.
git --git-dir="$infinity" archive HEAD infinity/models/__init__.py infinity/models/infinity.py infinity/models/basic.py \
    infinity/models/flex_attn.py infinity/models/fused_op.py infinity/models/bsq_vae \
    infinity/utils/dist.py infinity/utils/misc.py infinity/utils/dynamic_resolution.py tools/run_infinity.py \
    2> >(grep -v '^error: invalid object' >&2) | tar -x -C .official/infinity  # (mirror lacks large assets)
git --git-dir="$hart" archive HEAD hart/modules hart/utils sample.py 2> >(grep -v '^error: invalid object' >&2) \
    | tar -x -C .official/hart
{
    echo "infinity $(git --git-dir="$infinity" rev-parse HEAD)"
    echo "hart $(git --git-dir="$hart" rev-parse HEAD)"
} > .official/COMMITS

# flash_attn: the two calls Infinity's blocks make, on torch's SDPA (its flash kernel where bf16/fp16 and no mask).
cat > .official/shims/flash_attn/__init__.py <<'PY'
"""Stand-in for flash-attn (no wheel for the device): its calls mapped onto torch's scaled_dot_product_attention.

Without a mask SDPA picks its flash kernel for bf16/fp16 inputs on a GPU. Varlen calls run one SDPA per sequence
(no mask), so each still gets the flash kernel; batch 1 with guidance is two sequences.
"""
import torch
import torch.nn.functional as F


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """q, k, v: (B, L, H, c) -> (B, L, H, c)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous()  # flash-attn's output is contiguous; callers .view() it


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, **_):
    """q: (Nq, H, c), kv: (Nk, 2, H, c), sequences given by cumulative lengths -> (Nq, H, c)."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        qi = q[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1)[None]
        ki, vi = kv[bounds_k[i]:bounds_k[i + 1]].permute(1, 2, 0, 3)[:, None].unbind(0)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p, is_causal=causal,
                                                   scale=softmax_scale)[0].transpose(0, 1))
    return torch.cat(outs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
    return flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, **kw)
PY
# flash_attn.ops: absent, as without flash-attn's fused ops (both codes then take their own pure-torch path).
: > .official/shims/flash_attn/ops/__init__.py

# hart_backend.fused_kernels: HART's CUDA extension (RoPE, RMSNorm) in pure torch.
cat > .official/shims/hart_backend/__init__.py <<'PY'
from . import fused_kernels  # noqa: F401
PY
cat > .official/shims/hart_backend/fused_kernels.py <<'PY'
"""Stand-in for HART's compiled kernels (hart/kernels/csrc), in pure torch, same arguments and layouts."""
import torch


def _rope(t, freqs, transpose_output_memory=False):
    """t: (s, b, h, d); freqs: (s, 1, 1, d2) or (s, b, 1, d2) angles, rotating the first d2 channels (halves)."""
    d2 = freqs.shape[-1]
    x, rest = t[..., :d2].float(), t[..., d2:]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (x * freqs.cos() + rotated * freqs.sin()).to(t.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def fused_rope_forward_func(t, freqs, transpose_output_memory=False):
    return _rope(t, freqs.float())


def fused_rope_backward_func(grad, freqs, transpose_output_memory=False):
    return _rope(grad, -freqs.float())


def fused_rope_with_pos_forward_func(t, freqs, transpose_output_memory=False):
    """freqs: (b, s, d2) per batch row -> as (s, b, 1, d2)."""
    return _rope(t, freqs.float().transpose(0, 1)[:, :, None])


def rms_norm(out, input, weight, epsilon, use_quant=False):
    """In place into `out`, computed in float32 as the kernel does."""
    if use_quant:
        raise NotImplementedError("int8 RMSNorm is not part of HART inference")
    x = input.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
    out.copy_((y * weight.float()).to(out.dtype))
PY

# Fallbacks: only imported where the real package is missing (timm, pytz, imageio, cv2, torchvision: import-time names only).
mkdir -p .official/fallback/timm/models/layers .official/fallback/timm/loss
cat > .official/fallback/timm/__init__.py <<'PY'
"""Stand-in for timm where it is missing: the names Infinity imports (inference has no drop path)."""
PY
cat > .official/fallback/timm/models/__init__.py <<'PY'
def register_model(fn):
    return fn
PY
cat > .official/fallback/timm/models/layers/__init__.py <<'PY'
import torch


def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
    return x


class DropPath(torch.nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x
PY
cat > .official/fallback/timm/loss/__init__.py <<'PY'
import torch


class SoftTargetCrossEntropy(torch.nn.Module):
    def forward(self, x, target):
        return torch.sum(-target * torch.log_softmax(x, dim=-1), dim=-1).mean()
PY
cat > .official/fallback/pytz.py <<'PY'
"""Stand-in for pytz where it is missing (Infinity's logging helpers only)."""
import datetime


def timezone(name):
    return datetime.timezone.utc
PY
cat > .official/fallback/imageio.py <<'PY'
"""Stand-in for imageio where it is missing (imported by Infinity's VAE module, unused at inference)."""
PY
mkdir -p .official/fallback/torchvision/transforms
cat > .official/fallback/torchvision/__init__.py <<'PY'
"""Stand-in for torchvision where it is missing (or broken): imported by Infinity's VAE and run_infinity for
image I/O that inference does not call."""
from . import transforms  # noqa: F401
PY
cat > .official/fallback/torchvision/transforms/__init__.py <<'PY'
from . import functional  # noqa: F401
PY
cat > .official/fallback/torchvision/transforms/functional.py <<'PY'
def to_tensor(pic):
    raise NotImplementedError("torchvision is not installed")
PY
cat > .official/fallback/cv2.py <<'PY'
"""Stand-in for OpenCV where it is missing (run_infinity imports it to save images; not called here)."""
PY
du -sh .official
echo "official_export.sh: exported to .official/ ($(find .official -name '*.py' | wc -l) Python files):"
echo "  shims (first on sys.path): flash_attn -> torch SDPA (its flash kernel in bf16 without a mask), hart_backend.fused_kernels -> pure torch"
echo "  fallbacks (only where missing): timm, pytz, imageio, cv2, torchvision"
cat .official/COMMITS
