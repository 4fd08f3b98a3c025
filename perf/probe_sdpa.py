"""Which SDPA backends run MLA's attention shapes (q/k head dim 192, v 128 or padded to 192)."""
import math, warnings, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
warnings.simplefilter("always")
dev = "cuda"
for n in (4096,):
    for vd in (128, 192):
        q = torch.randn(128, n, 192, device=dev, dtype=torch.bfloat16)
        k = torch.randn(128, n, 192, device=dev, dtype=torch.bfloat16)
        v = torch.randn(128, n, vd, device=dev, dtype=torch.bfloat16)
        for name, qq, kk, vv in (("contig", q, k, v),
                                 ("transposed", q.transpose(0, 1).contiguous().transpose(0, 1),
                                  k.transpose(0, 1).contiguous().transpose(0, 1), v.transpose(0, 1).contiguous().transpose(0, 1))):
            for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                torch.cuda.reset_peak_memory_stats()
                with warnings.catch_warnings(record=True) as w:
                    try:
                        with sdpa_kernel([b]):
                            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=1 / math.sqrt(192))
                        torch.cuda.synchronize()
                        res = f"ok peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                    except Exception as e:
                        res = f"FAIL {type(e).__name__}: {str(e)[:150]}"
                print(f"n={n} vd={vd} {name:10s} {b.name:20s} {res} | {'; '.join(str(x.message)[:220] for x in w)}", flush=True)
