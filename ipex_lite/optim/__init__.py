"""Fused optimizers (IPEX names) with split-BF16 support.

Each class subclasses torch.optim.Optimizer, keeps torch's state names
(``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
``sum``, ``step``) and updates every parameter in one fused pass:

* fp32 parameter: a fast fused fp32 optimizer;
* bf16 parameter: the top half of a split fp32 master weight whose low
  16 bits live in ``state["trail"]`` (see :func:`split_master_weights_`);
  the update runs in fp32 on (top << 16) | trail and writes both halves.
"""
import torch

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "Lamb", "with_master_copy", "split_master_weights_", "master_weight", "update_in_backward_"]

ops = torch.ops.ipex_lite
_EMPTY = torch.empty(0, dtype=torch.bfloat16)


def _param2(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The trail of a bf16 (split) parameter, created as zeros when absent."""
    if p.dtype == torch.float32:
        return _EMPTY
    if p.dtype != torch.bfloat16:
        raise TypeError(f"{type(optimizer).__name__}: parameters must be float32 or bfloat16, got {p.dtype}")
    state = optimizer.state[p]
    if "trail" not in state:
        state["trail"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    return state["trail"]


def _rows(t: torch.Tensor, rows):
    """Rows [r0, r1) of a parameter-shaped tensor (all of it for rows=None or an empty placeholder)."""
    return t if rows is None or t.numel() == 0 else t[rows[0]:rows[1]]


def _dense_grad(optimizer, p):
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients; use "
                           "ipex_lite.nn.MergedEmbeddingBagWithSGD / WithAdaGrad for embedding tables")
    return g


def _check_param(optimizer, p):
    if not p.is_contiguous():
        raise ValueError(f"{type(optimizer).__name__}: parameters must be contiguous to be updated in place")


def _moment_state(optimizer, p, amsgrad: bool = False) -> dict:
    """Adam / AdamW / Lamb state of ``p`` (fp32 moments, created at the first step), step counted."""
    state = optimizer.state[p]
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
    state["step"] += 1
    return state


class _KeepStateDtypes:
    """Shared by the fused optimizers.

    * ``step`` runs the fused per-parameter ``_update`` of every parameter
      with a gradient.
    * ``load_state_dict``: torch casts floating state to the parameter's
      dtype, so fp32 momenta of a bf16 (split) parameter would become bf16
      and the trail would be rounded; hooks put the saved tensors back as they
      were, so a resumed run is bit-identical.
    * :func:`update_in_backward_` applies each parameter's update as soon as
      its gradient is accumulated.
    """

    def _keep_state_dtypes(self):
        self.register_load_state_dict_pre_hook(_stash_state_dict)
        self.register_load_state_dict_post_hook(_restore_state_dtypes)

    def _begin(self, group, p):
        """Counts the step of ``p`` and returns ``apply(grad, rows)``, which
        updates rows [r0, r1) of ``p`` from their gradient (all of ``p`` for
        rows=None).  The update is element-wise, so row ranges applied one by
        one give the same result as one call on the whole parameter."""
        raise NotImplementedError

    def _update(self, group, p):
        self._begin(group, p)(_dense_grad(self, p), None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_param(self, p)
                self._update(group, p)
        _new_step(self)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        _new_step(self)


def _evaluate(closure):
    """torch.optim's closure convention: re-evaluate the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _stash_state_dict(optimizer, state_dict):
    optimizer._loading_state_dict = state_dict
    # a checkpoint of a stock (fp32) optimizer has no trails: keep the current ones
    optimizer._loading_trails = {p: st["trail"] for p, st in optimizer.state.items() if "trail" in st}


def _restore_state_dtypes(optimizer):
    saved = optimizer.__dict__.pop("_loading_state_dict", None)
    trails = optimizer.__dict__.pop("_loading_trails", {})
    if saved is None:
        return
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        saved_state = saved["state"].get(pid, {})
        for key, value in saved_state.items():
            if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                value = value.detach().clone(memory_format=torch.contiguous_format)
                optimizer.state[p][key] = value if key == "trail" else value.float()
        if "trail" not in saved_state and p in trails and p.dtype == torch.bfloat16:
            optimizer.state[p]["trail"] = trails[p]


class SGD(_KeepStateDtypes, torch.optim.SGD):
    """torch.optim.SGD semantics (momentum, dampening, nesterov, weight_decay), fused."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False):
        if maximize:
            raise ValueError("ipex_lite.optim.SGD: maximize=True is not supported")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov)
        self._keep_state_dtypes()

    def _begin(self, group, p):
        state = self.state[p]
        momentum = group["momentum"]
        first = False
        buf = _EMPTY
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.empty(p.shape, dtype=torch.float32)
                state["momentum_buffer"] = buf
                first = True
        trail = _param2(self, p)

        def apply(grad, rows):
            ops.sgd_step_(_rows(p, rows), grad, _rows(buf, rows), _rows(trail, rows), float(group["lr"]),
                          float(momentum), float(group["dampening"]), bool(group["nesterov"]),
                          float(group["weight_decay"]), first)
        return apply


class _AdamStep(_KeepStateDtypes):
    _decoupled = False

    def _init(self, params, lr, betas, eps, weight_decay, amsgrad, maximize):
        if maximize:
            raise ValueError(f"ipex_lite.optim.{type(self).__name__}: maximize=True is not supported")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self._keep_state_dtypes()

    def _begin(self, group, p):
        beta1, beta2 = group["betas"]
        state = _moment_state(self, p, group["amsgrad"])
        m, v, vmax = state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", torch.empty(0))
        trail = _param2(self, p)

        def apply(grad, rows):
            ops.adam_step_(_rows(p, rows), grad, _rows(m, rows), _rows(v, rows), _rows(vmax, rows),
                           _rows(trail, rows), float(state["step"]), float(group["lr"]), float(beta1), float(beta2),
                           float(group["eps"]), float(group["weight_decay"]), bool(group["amsgrad"]),
                           bool(group.get("decoupled_weight_decay", self._decoupled)))
        return apply


class Adam(_AdamStep, torch.optim.Adam):
    """torch.optim.Adam semantics (weight_decay as L2, amsgrad), fused."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False):
        self._init(params, lr, betas, eps, weight_decay, amsgrad, maximize)


class AdamW(_AdamStep, torch.optim.AdamW):
    """torch.optim.AdamW semantics (decoupled weight decay), fused."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        self._init(params, lr, betas, eps, weight_decay, amsgrad, maximize)


class Adagrad(_KeepStateDtypes, torch.optim.Adagrad):
    """torch.optim.Adagrad semantics (lr_decay, eps, weight_decay, initial_accumulator_value), fused."""

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10, *,
                 maximize=False):
        if maximize:
            raise ValueError("ipex_lite.optim.Adagrad: maximize=True is not supported")
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps)
        for group in self.param_groups:  # torch creates the state in the parameter's dtype; keep it fp32
            for p in group["params"]:
                self._init_state(group, p)
        self._keep_state_dtypes()

    def _init_state(self, group, p):
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["sum"] = torch.full(p.shape, float(group["initial_accumulator_value"]), dtype=torch.float32)

    def _begin(self, group, p):
        state = self.state[p]
        if "sum" not in state:  # a group added after construction
            self._init_state(group, p)
        state["step"] += 1
        clr = group["lr"] / (1 + (float(state["step"]) - 1) * group["lr_decay"])
        total, trail = state["sum"], _param2(self, p)

        def apply(grad, rows):
            ops.adagrad_step_(_rows(p, rows), grad, _rows(total, rows), _rows(trail, rows), float(clr),
                              float(group["eps"]), float(group["weight_decay"]))
        return apply


class Lamb(_KeepStateDtypes, torch.optim.Optimizer):
    """IPEX's Lamb (layer-wise adaptive moments): the Adam direction
    ``u = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay * w`` scaled per
    parameter by the trust ratio ``||w|| / ||u||`` (1 when either is 0).
    torch has no Lamb, so this subclasses torch.optim.Optimizer directly."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        if not lr >= 0.0:
            raise ValueError(f"Lamb: invalid learning rate {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Lamb: betas must lie in [0, 1), got {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"Lamb: eps and weight_decay must be >= 0, got {eps} and {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._keep_state_dtypes()

    def _update(self, group, p):
        beta1, beta2 = group["betas"]
        grad = _dense_grad(self, p)
        state = _moment_state(self, p)
        ops.lamb_step_(p, grad, state["exp_avg"], state["exp_avg_sq"], _param2(self, p), float(state["step"]),
                       float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                       float(group["weight_decay"]))


class _UpdateInBackward:
    """Post-accumulate-grad hook: update this parameter now and free its gradient.

    Layers that build a parameter's gradient row block by row block
    (:class:`ipex_lite.nn.Fp32ComputeLinear`) may instead hand each block to
    :meth:`row_update` and never hold the whole gradient.  That is only right
    when the layer's gradient is the parameter's whole gradient, so they
    report each forward use with :meth:`note_use`, and a parameter used more
    than once since the last ``step()`` / ``zero_grad()`` takes the hook."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.uses = {}

    def _group(self, p):
        """p's param group; None once p has left the optimizer (its hook stays registered)."""
        return next((g for g in self.optimizer.param_groups if any(q is p for q in g["params"])), None)

    @torch.no_grad()
    def __call__(self, p):
        group = self._group(p)
        if p.grad is not None and group is not None:  # None: a layer applied it by row blocks already
            _check_param(self.optimizer, p)
            self.optimizer._update(group, p)
        p.grad = None

    def note_use(self, p):
        self.uses[p] = self.uses.get(p, 0) + 1

    def row_update(self, p):
        """``apply(grad_rows, (r0, r1))`` updating rows of ``p`` at once, or
        None when ``p`` must take its whole gradient through the hook."""
        opt = self.optimizer
        elementwise = type(opt)._begin is not _KeepStateDtypes._begin  # not Lamb: it needs whole-tensor norms
        group = self._group(p)
        if self.uses.get(p) != 1 or p.grad is not None or p.dim() == 0 or not elementwise or group is None:
            return None
        _check_param(opt, p)
        return opt._begin(group, p)


def _new_step(optimizer):
    hook = getattr(optimizer, "_update_in_backward", None)
    if hook is not None:
        hook.uses.clear()


def update_in_backward_hook(p: torch.Tensor):
    """The :func:`update_in_backward_` hook registered on ``p``, or None."""
    hooks = getattr(p, "_post_accumulate_grad_hooks", None) or {}
    return next((h for h in hooks.values() if isinstance(h, _UpdateInBackward)), None)


def update_in_backward_(optimizer: torch.optim.Optimizer):
    """Applies each parameter's fused update inside backward, as soon as its
    gradient is accumulated (while it is still in cache), and frees the
    gradient right away: no pass over all gradients after backward and no
    gradient storage held across the step.  ``optimizer.step()`` then has
    nothing left to do.  Semantics: one backward per step (no gradient
    accumulation over several backward calls) and no gradient clipping or
    other use of the gradients across parameters.  Results equal those of
    the separate step.  Returns the hook handles (``.remove()`` undoes it).

    :class:`ipex_lite.nn.Fp32ComputeLinear` goes further for SGD, Adam,
    AdamW and Adagrad: it updates its weight row block by row block as it
    computes the weight gradient, so not even one whole weight gradient is
    held.  It does so for a weight used once since the last ``step()`` or
    ``zero_grad()`` (call one of them every step; otherwise the weight takes
    the whole-gradient hook), and a weight that one of its layers shares
    with a layer of another kind, or that forward code also reads directly,
    must not be updated in backward at all."""
    if not isinstance(optimizer, _KeepStateDtypes):
        raise TypeError("update_in_backward_ needs an ipex_lite.optim optimizer")
    hook = _UpdateInBackward(optimizer)
    optimizer._update_in_backward = hook
    return [p.register_post_accumulate_grad_hook(hook) for g in optimizer.param_groups for p in g["params"]]


def split_master_weights_(optimizer: torch.optim.Optimizer) -> None:
    """Turns every fp32 parameter of ``optimizer`` into split-BF16 storage in place:
    ``param.data`` becomes the bf16 top half and ``optimizer.state[param]["trail"]``
    the low half, so fp32 = (top << 16) | trail exactly (4 bytes per parameter)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.dtype != torch.float32:
                continue
            top, trail = ops.split_float_bfloat16(p.data)
            p.data = top
            optimizer.state[p]["trail"] = trail


def master_weight(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The fp32 value of parameter ``p`` (top and trail joined for a split parameter)."""
    if p.dtype == torch.float32:
        return p.detach()
    return ops.cat_bfloat16_float(p.detach(), _param2(optimizer, p))


class _MasterCopy:
    """Mixin for an optimizer ipex_lite has no fused version of (IPEX's fallback): the model
    computes with bf16 weights while this optimizer steps fp32 master copies of them (6 bytes
    per parameter); each step takes the bf16 gradients into the masters and rounds the updated
    masters back into the bf16 weights."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for p, master in self._master_pairs:
            master.grad = None if p.grad is None else p.grad.detach().float()
        super().step()
        for p, master in self._master_pairs:
            p.copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for p, _ in self._master_pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        return next(m for q, m in self._master_pairs if q is p)


def with_master_copy(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """The same optimizer (class, param groups, hyperparameters, state) stepping fp32 master
    copies of ``params``, which become bf16 in place.  Returns a new optimizer object."""
    if type(optimizer) is torch.optim.LBFGS:
        raise TypeError("with_master_copy: LBFGS re-evaluates the closure inside step; keep it in fp32")
    chosen = {id(p) for p in params}
    masters = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in chosen and p.dtype == torch.float32 and id(p) not in masters:
                masters[id(p)] = torch.nn.Parameter(p.detach().clone())
    cls = type(f"MasterCopy{type(optimizer).__name__}", (_MasterCopy, type(optimizer)), {})
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [masters.get(id(p), p) for p in g["params"]]}
              for g in optimizer.param_groups]
    new = cls(groups, **optimizer.defaults)
    for p, st in optimizer.state.items():
        new.state[masters.get(id(p), p)] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()}
    pairs = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in masters and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
                pairs.append((p, masters[id(p)]))
    new._master_pairs = pairs
    return new
