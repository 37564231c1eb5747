"""Reference optimizers that torch.optim lacks, written with stock torch ops."""
import torch


class RefLamb(torch.optim.Optimizer):
    """IPEX's Lamb written with stock torch ops (unfused, fp32): the reference."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (m / (1 - b1 ** st["step"])) / ((v / (1 - b2 ** st["step"])).sqrt() + group["eps"])
                u.add_(p, alpha=group["weight_decay"])
                wn, un = p.double().norm().item(), u.double().norm().item()
                ratio = wn / un if wn > 0 and un > 0 else 1.0
                p.sub_(u * (group["lr"] * ratio))
