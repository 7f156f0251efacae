"""Numbers every backend and baseline shares, defined once."""

from __future__ import annotations

import torch

# float32's smallest normal number, 1.1754944e-38: the floor of q in log q for attention_kl's
# kind="probs" (a student probability of 0 gives a large finite loss, not inf).
TINY = torch.finfo(torch.float32).tiny
