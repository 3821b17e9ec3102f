"""PyTorch over one pinned Delta version: the per-worker function that runtime.launch runs (DDP on several).

``fit_torch(ctx)`` reads the worker's share of the rows (training.data, never through the driver),
builds the spec's module (``model.module``, default :class:`~lakeray.training.torch_models.TabularMLP`),
standardises with statistics of all workers' training rows, and hands the tensors to the plain loop in
:mod:`~lakeray.training.torch_loop` (no Ray in there). With several workers the module is wrapped in
``DistributedDataParallel`` over the process group Ray Train's ``TorchTrainer`` set up.

Checkpoints (every ``checkpoint_every`` epochs and the final one) hold ``model.pt`` (the module's
state dict: all the driver and serving need) and ``train_state.pt`` (optimizer state, epoch, the best
epoch's weights under early stopping: what a resume needs). A resumed run continues at the next epoch
with the same seeds, so it trains the epochs it redoes exactly as before.

A user's module is ``package.module:Factory``: an importable module, or a file next to the spec
(``module: sequence_model:CustomerSequenceModel`` loads ``jobs/training/sequence_model.py`` for a spec
in ``jobs/training/``). :func:`validate_torch_spec` imports and builds it on a dummy shape before any
data is read, so a typo costs no cluster time.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from lakeray.training.runtime import WorkerContext
    from lakeray.training.spec import TrainPlan, TrainSpec

__all__ = ["fit_torch", "load_torch", "predict_torch", "validate_torch_spec", "build_module", "MODEL_FILE",
           "TRAIN_STATE_FILE"]

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
_FIX_IMPORT = ("set model.module to `package.module:Factory` of an installed module, or of a .py file next to "
               "the spec (default lakeray.training.torch_models:TabularMLP)")


# -- the user's module ------------------------------------------------------------------------------
def _spec_folder(where: str) -> str | None:
    # ``where`` is the spec file, or "<run.json>: spec" for a resumed run.
    for candidate in (where, where.rsplit(": ", 1)[0]):
        if candidate and os.path.isfile(candidate):
            return os.path.dirname(os.path.abspath(candidate))
    return None


def _import_module(name: str, where: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the named module itself (or its package) missing sends us to look for a file; a missing
        # dependency inside a module that exists is the user's error to see as it is.
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise
    relative = os.path.join(*name.split(".")) + ".py"
    folders = [f for f in (_spec_folder(where), os.getcwd()) if f]
    for folder in folders:
        path = os.path.join(folder, relative)
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before exec: dataclasses and pickling look the module up
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
    raise ModuleNotFoundError(f"no module named {name!r} (nor {relative} in {' or '.join(folders)})", name=name)


def _factory(module_path: str, where: str) -> Callable[..., Any]:
    """The factory named by ``package.module:Attr``; ConfigError naming model.module otherwise."""
    name, _, attr = module_path.partition(":")
    if not name or not attr:
        raise ConfigError(f"{where}: model.module: {module_path!r} must be `package.module:Factory`", _FIX_IMPORT)
    try:
        module = _import_module(name, where)
    except Exception as exc:  # noqa: BLE001 - any import-time failure of user code is a spec error
        raise ConfigError(f"{where}: model.module: {name!r} does not import ({type(exc).__name__}: {exc})",
                          _FIX_IMPORT) from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"{where}: model.module: {name} has no attribute {attr!r}",
                              f"name a class or function defined in {name}")
    if not callable(target):
        raise ConfigError(f"{where}: model.module: {module_path} is not callable", "name an nn.Module class or a "
                          "function returning one")
    return target


def _wants_names(factory: Callable[..., Any]) -> bool:
    try:
        return "feature_names" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _call(factory: Callable[..., Any], num_features: int, cardinalities: dict[int, int], params: dict[str, Any],
          feature_names: list[str] | None) -> Any:
    kwargs = dict(params)
    if feature_names is not None and _wants_names(factory):
        kwargs["feature_names"] = list(feature_names)
    return factory(num_features, cardinalities, **kwargs)


def _cardinalities(plan: TrainPlan) -> dict[int, int]:
    return {plan.features.index(c): len(vocab) for c, vocab in plan.categorical.items() if c in plan.features}


def _module_path(spec: TrainSpec) -> str:
    from lakeray.training.spec import DEFAULT_TORCH_MODULE

    return spec.model.module or DEFAULT_TORCH_MODULE


def build_module(plan: TrainPlan) -> nn.Module:
    """The spec's module for the plan's features (seeded by the caller), on CPU."""
    factory = _factory(_module_path(plan.spec), plan.where)
    try:
        return _call(factory, len(plan.features), _cardinalities(plan), plan.spec.model.params, plan.features)
    except Exception as exc:  # noqa: BLE001 - user code: say which field to fix
        raise ConfigError(f"{plan.where}: model.module: {_module_path(plan.spec)} does not build for the "
                          f"{len(plan.features)} features of {plan.input} ({type(exc).__name__}: {exc})",
                          "fix model.params or the module") from None


def validate_torch_spec(spec: TrainSpec, where: str = "train spec") -> None:
    """Import the spec's module and build it on a dummy shape (2 rows) before any data is read.

    With an explicit feature list the build uses those names and categorical columns; with
    ``all_except`` the columns are not known yet, so a factory that asks for ``feature_names`` is only
    checked for accepting ``model.params`` (it is built for real on the workers).
    """
    import torch

    if spec.model.kind != "torch":
        return
    path = _module_path(spec)
    factory = _factory(path, where)
    names = list(spec.features) if isinstance(spec.features, list) else None
    if names is None and _wants_names(factory):
        try:
            inspect.signature(factory).bind(4, {}, feature_names=["f0", "f1", "f2", "f3"], **spec.model.params)
        except TypeError as exc:
            raise ConfigError(f"{where}: model.params: {path} does not take them ({exc})",
                              "give only the factory's keyword arguments") from None
        return
    num_features = len(names) if names else 4
    if names is not None:
        cards = {names.index(c): 3 for c in spec.categorical if c in names}
    else:
        cards = {0: 3} if spec.categorical else {}
    try:
        torch.manual_seed(0)
        module = _call(factory, num_features, cards, spec.model.params, names or [f"f{j}" for j in range(num_features)])
    except Exception as exc:  # noqa: BLE001 - user code
        raise ConfigError(f"{where}: model.module: {path} does not build with model.params {spec.model.params} "
                          f"({type(exc).__name__}: {exc})", "fix model.params (the factory's keyword "
                          "arguments) or the module") from None
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{where}: model.module: {path} returned {type(module).__name__}, not a torch.nn.Module",
                          "the factory must return an nn.Module")
    try:
        with torch.no_grad():
            out = module.eval()(torch.zeros(2, num_features))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{where}: model.module: {path} fails on a dummy batch of 2 rows × {num_features} "
                          f"features ({type(exc).__name__}: {exc})", "forward(x) takes the float32 feature "
                          "matrix and returns one logit per row") from None
    if out.numel() != 2:
        raise ConfigError(f"{where}: model.module: {path} returns shape {tuple(out.shape)} for 2 rows",
                          "forward(x) must return one logit per row: shape (rows,) or (rows, 1)")


# -- training ---------------------------------------------------------------------------------------
def _local_rank(ctx: WorkerContext) -> int:
    if ctx.world == 1:
        return 0
    import ray.train

    return ray.train.get_context().get_local_rank()


def _saver(module: nn.Module, optimizer: Any, epoch: int, best: dict[str, Any] | None,
           weights: dict[str, Any] | None = None) -> Callable[[str], None]:
    import torch

    def write(folder: str) -> None:
        state = weights if weights is not None else {k: v.detach().cpu() for k, v in module.state_dict().items()}
        torch.save(state, os.path.join(folder, MODEL_FILE))
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None, "epoch": epoch,
                    "best": best}, os.path.join(folder, TRAIN_STATE_FILE))

    return write


def _better(value: float, best: float | None, direction: str) -> bool:
    if best is None:
        return True
    return value > best if direction == "max" else value < best


def fit_torch(ctx: WorkerContext) -> None:
    """Runs on every worker (rank 0 of 1 in a Ray task, or each rank of a TorchTrainer worker group)."""
    # Before torch loads OpenMP: idle threads sleep instead of spinning. Two spinning threads on a
    # 2-core machine with other work made an epoch 1.5-30x slower (docs/decisions.md); passive cost
    # nothing measurable on an idle one. An operator's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    from lakeray.training import torch_loop as loop
    from lakeray.training.data import load_split

    plan = ctx.plan
    model_spec = plan.spec.model
    torch.set_num_threads(ctx.threads)
    distributed = ctx.world > 1
    started = time.perf_counter()
    data = load_split(plan, ctx.rank, ctx.world, plan.extra.get("shards"))
    load_s = time.perf_counter() - started

    device = loop.device_for(ctx.use_gpu, _local_rank(ctx))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    loop.seed_everything(model_spec.seed)
    module = build_module(plan)
    if hasattr(module, "set_feature_stats"):
        mean, std = loop.feature_stats(data.x_train, list(range(len(plan.features))), device, distributed)
        module.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))

    resume_dir, done = ctx.resume()
    optimizer_state, best = None, None
    if resume_dir is not None:
        module.load_state_dict(torch.load(os.path.join(resume_dir, MODEL_FILE), map_location="cpu", weights_only=True))
        saved = torch.load(os.path.join(resume_dir, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)
        optimizer_state, best = saved["optimizer"], saved.get("best")
    module.to(device)
    model: Any = module
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # The buffers (standardisation, vocabulary sizes) are equal on every rank: no per-step broadcast.
        model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)

    total, every = model_spec.rounds, plan.spec.checkpoint_every
    metric, direction = plan.spec.metric.name, plan.spec.metric.direction
    early = plan.spec.early_stopping
    loop_started = time.perf_counter()

    def on_epoch(epoch: int, metrics: dict[str, float], trained: nn.Module, optimizer: Any) -> bool:
        nonlocal best
        value = float(metrics.get(f"valid_{metric}", float("nan")))
        ctx.progress(epoch, {f"valid_{metric}": value, "train_loss": round(metrics["train_loss"], 6),
                             "epoch_s": round(metrics["epoch_s"], 3),
                             "elapsed_s": round(time.perf_counter() - loop_started, 3)})
        stop = False
        if early is not None:
            if _better(value, None if best is None else best["value"], direction):
                best = {"step": epoch, "value": value, "weights": loop.clone_state(trained)}
            stop = epoch - best["step"] >= early.rounds
        if epoch % every == 0 and epoch != total and not stop:
            ctx.checkpoint(epoch, {f"valid_{metric}": value}, _saver(trained, optimizer, epoch, best))
        return stop

    result = loop.train_epochs(
        model, data.x_train, data.y_train, data.x_valid, data.y_valid, epochs=total, start_epoch=done,
        batch_size=model_spec.batch_size, lr=model_spec.learning_rate, device=device, seed=model_spec.seed,
        optimizer_state=optimizer_state, on_epoch=on_epoch, distributed=distributed)
    # The epochs themselves (validation and checkpoints included); building the first AdamW in a
    # process imports torch._dynamo (~4 s here): start-up, like the other imports.
    train_s = float(result["train_s"])

    # The driver sees rank 0's checkpoint only: gather the slowest timings and the row counts.
    sums = np.array([float(len(data.y_train)), float(len(data.y_valid))])
    maxima = np.array([train_s, load_s])
    if distributed:
        sums = loop.all_reduce(sums, "sum", device)
        maxima = loop.all_reduce(maxima, "max", device)
    steps = int(result["epochs"])
    final = {"train_rows": float(sums[0]), "valid_rows": float(sums[1]), "train_s": float(maxima[0]),
             "load_s": float(maxima[1]), "steps": float(steps)}
    weights = None
    if early is not None and best is not None:
        final["best_step"] = float(best["step"])
        weights = best["weights"]  # the final model is the best epoch's
    ctx.checkpoint(steps, final, _saver(module, result.get("optimizer"), steps, best, weights), final=True)


# -- the driver ------------------------------------------------------------------------------------
def load_torch(checkpoint_dir: str, plan: TrainPlan) -> nn.Module:
    """The checkpoint's module on CPU in eval mode (the driver never needs a GPU to evaluate or serve)."""
    import torch

    module = build_module(plan)
    state = torch.load(os.path.join(checkpoint_dir, MODEL_FILE), map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return module.eval()


def predict_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """P(label = 1) of each row of the encoded float32 matrix ``x``."""
    import torch

    from lakeray.training.torch_loop import predict_proba

    return predict_proba(model, x, torch.device("cpu"))
