"""Study shim (not part of the official code): torch 2.13 removed the `verbose` argument of LR schedulers, which the
official training/trainer_exp.py passes (ExponentialLR(..., gamma=0.95, verbose=True)). Accept it and print what
torch < 2.7 printed with verbose=True after every scheduler step; the schedule itself is torch's, unchanged."""
import torch.optim.lr_scheduler as _s

_init, _step = _s.ExponentialLR.__init__, _s.ExponentialLR.step


def __init__(self, optimizer, gamma, last_epoch=-1, verbose=False):
    self._study_verbose = verbose
    _init(self, optimizer, gamma, last_epoch)


def step(self, *args, **kwargs):
    _step(self, *args, **kwargs)
    if getattr(self, "_study_verbose", False):
        for i, lr in enumerate(self.get_last_lr()):
            print(f"Adjusting learning rate of group {i} to {lr:.4e}.", flush=True)


_s.ExponentialLR.__init__, _s.ExponentialLR.step = __init__, step
