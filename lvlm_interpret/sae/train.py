"""Training an SAE on cached activations: TopK with aux-k (SAELens 6's recipe) or ReLU with a decoder-norm
weighted L1 penalty; inputs scaled to norm sqrt(d_in) on average, the scale folded into the weights at the end;
Adam (0.9, 0.999), gradient clipping at 1; seeded; a checkpoint at every evaluation, from which a run with the same
settings resumes; stops when the held-out explained variance stops improving."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserInputError
from .metrics import explained_variance
from .model import SparseAutoencoder, architecture_name

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainConfig:
    architecture: str = "topk"
    expansion: int = 8
    k: int = 32
    l1: float = 5.0  # standard (relu) only: SAELens' l1_coefficient on sum_i f_i ||W_dec,i||
    lr: float = 3e-4
    batch_size: int = 1024
    max_steps: int = 20000
    eval_every: int = 250
    patience: int = 4  # evaluations without a gain of `min_gain` in held-out explained variance before stopping
    min_gain: float = 1e-3
    dead_steps: int = 250  # a feature silent this many steps is dead (aux-k revives it)
    seed: int = 0

    def check(self) -> None:
        self.architecture = architecture_name(self.architecture)
        if self.architecture not in ("topk", "standard"):
            raise UserInputError(f"--architecture {self.architecture} cannot be trained here: use topk or relu")
        for name in ("expansion", "k", "batch_size", "max_steps", "eval_every", "patience", "dead_steps"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.l1 >= 0):
            raise UserInputError(f"--lr must be positive and --l1 at least 0, got {self.lr} and {self.l1}")


@dataclass
class TrainResult:
    sae: SparseAutoencoder  # folded: reads the hook's raw activations
    input_scale: float  # the factor the inputs were multiplied by in training (folded into the weights)
    mean: torch.Tensor  # the mean training activation [d_in] (mean ablation)
    steps: int
    stopped: str  # "plateau" or "max_steps"
    history: list[dict] = field(default_factory=list)  # one entry per evaluation


def split_by_image(owners: torch.Tensor, held_out_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) token masks: the last share of the images is held out (one image at least, none when
    there is only one image: then the held-out figures are on training data)."""
    n_images = int(owners.max()) + 1
    cut = n_images - max(1, round(n_images * held_out_share)) if n_images > 1 else n_images
    train = owners < cut
    return train, (~train if n_images > 1 else train)


def aux_k_loss(sae: SparseAutoencoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """SAELens' aux-k: the d_in / 2 strongest dead features reconstruct what the live ones missed, weighted by
    min(#dead / (d_in / 2), 1)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = sae.d_in // 2 or 1
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    top = masked.topk(min(k_aux, n_dead), dim=-1)
    features = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    recon = features @ sae.W_dec
    return min(n_dead / k_aux, 1.0) * (recon - residual).pow(2).sum(-1).mean()


def _loss(sae: SparseAutoencoder, config: TrainConfig, x: torch.Tensor, dead: torch.Tensor):
    pre = sae.pre_activation(x)
    features = sae.activation(pre)
    x_hat = sae.decode(features)
    mse = (x_hat - x).pow(2).sum(-1).mean()
    if sae.architecture == "topk":
        extra = aux_k_loss(sae, pre, (x - x_hat).detach(), dead)
    else:
        extra = config.l1 * (features * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    return mse + extra, features


def _checkpoint_key(config: TrainConfig, data_key: dict) -> dict:
    """What a checkpoint must match to be resumed; --max-steps may grow (train on from where a run stopped)."""
    return {**{k: v for k, v in asdict(config).items() if k != "max_steps"}, **data_key}


def train_sae(activations: torch.Tensor, owners: torch.Tensor, config: TrainConfig, folder=None,
              data_key: dict | None = None, progress: bool = True) -> TrainResult:
    """Train on `activations` [tokens, d_in] (any float dtype) whose image each token came from is `owners`.
    With `folder`, a checkpoint is kept there and a run with the same config and `data_key` resumes from it."""
    config.check()
    train_mask, held_mask = split_by_image(owners)
    train_x, held_x = activations[train_mask], activations[held_mask].float()
    d_in = activations.shape[1]
    if config.architecture == "topk" and config.k > d_in * config.expansion:
        raise UserInputError(f"--k {config.k} is more than the SAE's {d_in * config.expansion} features")
    norms = train_x.float().norm(dim=-1)
    scale = float(math.sqrt(d_in) / norms.mean()) if float(norms.mean()) > 0 else 1.0
    mean = train_x.float().mean(0)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    sae = SparseAutoencoder(d_in, d_in * config.expansion, config.architecture, k=config.k)
    sae.initialise(generator)
    with torch.no_grad():
        sae.b_dec.copy_(mean * scale)
    optimiser = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999))
    silent = torch.zeros(sae.d_sae, dtype=torch.long)
    state = {"step": 0, "best": -math.inf, "stale": 0, "history": [], "stopped": "max_steps"}
    key = _checkpoint_key(config, data_key or {"tokens": int(activations.shape[0]), "d_in": d_in})
    checkpoint = Path(folder) / CHECKPOINT_FILE if folder is not None else None
    order, cursor = torch.randperm(train_x.shape[0], generator=generator), 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        if saved["key"] != key:
            raise UserInputError(f"{checkpoint} is a checkpoint of other settings or data: use another --out, or "
                                 "delete it to start again")
        sae.load_state_dict(saved["sae"])
        optimiser.load_state_dict(saved["optimiser"])
        silent, generator = saved["silent"], torch.Generator()
        generator.set_state(saved["generator"])
        state, order, cursor = saved["state"], saved["order"], saved["cursor"]
    bar = tqdm(total=config.max_steps, initial=state["step"], disable=not progress, desc="sae", unit="step",
               dynamic_ncols=True)
    while state["step"] < config.max_steps and state["stopped"] != "plateau":
        if cursor + config.batch_size > order.shape[0]:
            order, cursor = torch.randperm(train_x.shape[0], generator=generator), 0
        batch = train_x[order[cursor:cursor + config.batch_size]].float() * scale
        cursor += config.batch_size
        loss, features = _loss(sae, config, batch, silent >= config.dead_steps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimiser.step()
        fired = (features > 0).any(0)
        silent = torch.where(fired, torch.zeros_like(silent), silent + 1)
        state["step"] += 1
        bar.update(1)
        if state["step"] % config.eval_every == 0 or state["step"] == config.max_steps:
            with torch.no_grad():
                variance = explained_variance(held_x * scale, sae(held_x * scale))
            entry = {"step": state["step"], "loss": float(loss.detach()), "explained_variance": variance,
                     "l0": float((features > 0).sum(-1).float().mean()),
                     "dead_fraction": float((silent >= config.dead_steps).float().mean())}
            state["history"].append(entry)
            state["stale"] = 0 if variance > state["best"] + config.min_gain else state["stale"] + 1
            state["best"] = max(state["best"], variance)
            if state["stale"] >= config.patience:
                state["stopped"] = "plateau"
            bar.set_postfix(ev=f"{variance:.3f}", l0=f"{entry['l0']:.1f}", dead=f"{entry['dead_fraction']:.2f}")
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                partial = checkpoint.with_name(checkpoint.name + ".partial")
                torch.save({"key": key, "sae": sae.state_dict(), "optimiser": optimiser.state_dict(),
                            "silent": silent, "generator": generator.get_state(), "state": state,
                            "order": order, "cursor": cursor}, partial)
                partial.replace(checkpoint)
    bar.close()
    sae.fold_input_scale(scale)
    return TrainResult(sae.eval(), scale, mean, state["step"], state["stopped"], state["history"])
