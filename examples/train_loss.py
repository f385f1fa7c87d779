"""GMFlow's transition loss in a training loop: a small conv net learns a K = 4 u-GM.

Each step draws a noise level sigma_high, a lower one sigma_low = sigma_high * (1 - 0.5 U), the
state x_low on the data path and x_high from the forward transition x_low -> x_high; the net
predicts the u-GM at (x_high, t_high) and ``gmkernels.transition_loss`` is the NLL of x_low under
the exact reverse transition of that GM (on CUDA one fused forward and one fused backward kernel;
here on the CPU the differentiable reference). The loss printed goes down.

Run: python examples/train_loss.py
"""

import torch
from torch import nn

import gmkernels

K, C, H, W, B = 4, 1, 8, 8, 32


class TinyGMNet(nn.Module):
    """x_t (B, C, H, W), t (B,) -> u-GM {means (B, K, C, H, W), logstds (B, 1, 1, 1, 1), logweights (B, K, 1, H, W)}."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(C + 1, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU()
        )
        self.means = nn.Conv2d(width, K * C, 1)
        self.logits = nn.Conv2d(width, K, 1)
        self.logstd = nn.Linear(1, 1)

    def forward(self, x, t):
        s = (t / 1000).view(-1, 1, 1, 1)
        h = self.body(torch.cat([x, s.expand(-1, 1, H, W)], 1))
        return {
            "means": self.means(h).view(-1, K, C, H, W),
            "logstds": self.logstd(s.view(-1, 1)).view(-1, 1, 1, 1, 1),
            "logweights": self.logits(h).view(-1, K, 1, H, W).log_softmax(1),
        }


def data(n: int, gen: torch.Generator) -> torch.Tensor:
    """Toy images: a random sign per image times a fixed stripe pattern, plus small noise."""
    stripes = torch.linspace(-1, 1, W).expand(H, W)
    sign = torch.randint(0, 2, (n, 1, 1, 1), generator=gen) * 2.0 - 1
    return sign * stripes + 0.05 * torch.randn(n, C, H, W, generator=gen)


if __name__ == "__main__":
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = TinyGMNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    window = []
    for step in range(1, 121):
        x0 = data(B, gen)
        s_high = torch.rand(B, 1, 1, 1, generator=gen).clamp(0.02, 1.0)
        s_low = s_high * (1 - 0.5 * torch.rand(B, 1, 1, 1, generator=gen))
        x_low = (1 - s_low) * x0 + s_low * torch.randn(x0.shape, generator=gen)
        ratio = (1 - s_high) / (1 - s_low)  # forward transition x_low -> x_high
        x_high = ratio * x_low + (s_high.square() - (ratio * s_low).square()).clamp_min(0).sqrt() * torch.randn(
            x0.shape, generator=gen
        )
        gm_u = net(x_high, 1000 * s_high.view(-1))
        loss = gmkernels.transition_loss(gm_u, x_high, 1000 * s_high, x_low, 1000 * s_low)
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step % 30 == 0:
            print(f"steps {step - 29:3d}-{step:3d}  mean transition loss {sum(window) / len(window):+.4f}")
            window = []
