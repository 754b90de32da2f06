"""`python -m lvlm_interpret sae train ...` and `sae encode ...`; the conventions of `explain` (one `error: ...` line
and exit 2 on bad input, output moved into --out only when complete)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from ..export import staged_folder
from ..images import load_image
from ..models.loading import DEFAULT_MODEL, load_model
from .activations import DEFAULT_PROMPT
from .features import encode_image, load_sae_for
from .format import SAE_NAMES, load_sae
from .pipeline import DataSpec, train_on_model
from .train import TrainConfig

COMMANDS = ("sae",)


def add_parsers(commands) -> None:
    sae = commands.add_parser("sae", help="sparse autoencoders: train one on a hook point, encode an image, measure "
                                          "its features (auroc) and their effect on answers (steering)")
    actions = sae.add_subparsers(dest="sae_command", required=True, parser_class=type(sae),
                                 metavar="{train,encode,auroc,steering}")
    defaults = TrainConfig()
    train = actions.add_parser("train", help="train an SAE on a hook point's image-token activations")
    train.add_argument("--model", default=DEFAULT_MODEL)
    train.add_argument("--hook", required=True, help="hook point, e.g. vision.blocks.3.hook_resid_post or "
                                                     "lm.blocks.1.hook_resid_post")
    train.add_argument("--architecture", default="topk", choices=["topk", "relu"])
    train.add_argument("--expansion", type=int, default=defaults.expansion, help="features per input dimension")
    train.add_argument("--k", type=int, default=defaults.k, help="topk: active features per token")
    train.add_argument("--l1", type=float, default=defaults.l1, help="relu: L1 coefficient")
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="tokens per step")
    train.add_argument("--max-steps", type=int, default=defaults.max_steps,
                       help="at most this many steps (training stops earlier on an explained-variance plateau)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--dataset", choices=["shapes"], default=None, help="shapes: demo scenes (with --n)")
    train.add_argument("--n", type=int, default=None, help="number of demo scenes (default 1000)")
    train.add_argument("--images", help="folder of training images (instead of --dataset shapes)")
    train.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text asked with every image (LM hooks)")
    train.add_argument("--eval-scenes", type=int, default=20,
                       help="held-out demo scenes whose questions measure the spliced-in effect (shapes)")
    train.add_argument("--device", default="auto")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--out", required=True, help="output folder (SAELens format); rerun to resume")

    # what encode, auroc and steering share: the SAE, the model it reads and the device
    uses_sae = type(sae)(add_help=False)
    uses_sae.add_argument("--sae", required=True, help=f"SAE folder (SAELens format) or {' / '.join(SAE_NAMES)}")
    uses_sae.add_argument("--model", default=None, help="default: the model the SAE was trained on")
    uses_sae.add_argument("--device", default="auto")

    encode = actions.add_parser("encode", help="an image's SAE features on the map's grid", parents=[uses_sae])
    encode.add_argument("--image", required=True)
    encode.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text asked with the image (LM hooks)")
    encode.add_argument("--top-k", type=int, default=10, help="features listed per cell in result.json")
    encode.add_argument("--out", required=True, help="output folder for features.npz and result.json")

    auroc = actions.add_parser("auroc", help="demo scenes: the feature that best picks out each colour and shape "
                                             "(AUROC over object cells, held-out scenes)", parents=[uses_sae])
    auroc.add_argument("--n-select", type=int, default=50, help="held-out scenes that choose each feature")
    auroc.add_argument("--n-eval", type=int, default=50, help="further held-out scenes that measure it")
    auroc.add_argument("--out", required=True, help="output folder for auroc.json")

    steering = actions.add_parser("steering", help="demo scenes: how often zeroing or clamping a colour feature "
                                                   "changes the answer to a colour question", parents=[uses_sae])
    steering.add_argument("--auroc", default=None, help="the auroc.json naming each colour's feature (default: the "
                                                        "SAE folder's)")
    steering.add_argument("--n-scenes", type=int, default=50, help="held-out scenes whose colour questions are asked")
    steering.add_argument("--out", required=True, help="output folder for steering.json")

def _data_spec(args) -> DataSpec:
    if args.images and (args.dataset or args.n is not None):
        raise UserInputError("give either --dataset shapes --n N or --images DIR, not both")
    if args.images:
        return DataSpec("images", images_dir=args.images, prompt=args.prompt, eval_scenes=args.eval_scenes)
    return DataSpec("shapes", n=1000 if args.n is None else args.n, prompt=args.prompt, eval_scenes=args.eval_scenes)


def run_train(args) -> dict:
    config = TrainConfig(architecture=args.architecture, expansion=args.expansion, k=args.k, l1=args.l1, lr=args.lr,
                         batch_size=args.batch_size, max_steps=args.max_steps, seed=args.seed)
    config.check()
    data = _data_spec(args)
    data.check()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    loaded = load_model(args.model, device=args.device)
    command = shlex.join(["python", "-m", "lvlm_interpret", *sys.argv[1:]]) if sys.argv[1:2] == ["sae"] else ""
    metrics = train_on_model(loaded, args.hook, config, data, out, progress=not args.no_progress, command=command)
    held = metrics["held_out"]
    print(f"wrote {out}: {metrics['d_sae']} features on {args.hook}, {metrics['steps']} steps ({metrics['stopped']}); "
          f"held out: L0 {held['l0']:.1f}, explained variance {held['explained_variance']:.3f}, "
          f"dead {100 * held['dead_fraction']:.1f}%")
    if "spliced" in metrics:
        spliced = metrics["spliced"]
        print(" | ".join(f"{name}: nll {spliced[name]['nll']:.3f}, answer kept {spliced[name]['answer_kept']:.2f}"
                         for name in ("clean", "sae", "mean_ablated")))
    return metrics


def run_encode(args) -> dict:
    if args.top_k < 1:
        raise UserInputError(f"--top-k must be at least 1, got {args.top_k}")
    if not args.prompt.strip():
        raise UserInputError("--prompt is empty: give the text asked with the image")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    image = load_image(args.image)
    _, config = load_sae(args.sae)  # a bad --sae fails before a model loads
    model_name = args.model or config["metadata"].get("model_name") or DEFAULT_MODEL
    loaded = load_model(model_name, device=args.device)
    bundle = load_sae_for(loaded, args.sae)
    grid = encode_image(loaded, bundle, image, args.prompt)
    record = {"model": model_name, "sae": str(bundle.path), "prompt": args.prompt, "image": str(args.image),
              **grid.to_json(args.top_k)}
    with staged_folder(out) as staging:
        np.savez_compressed(staging / "features.npz", activations=grid.activations)
        (staging / "result.json").write_text(json.dumps(record))
    rows, cols, n = grid.activations.shape
    print(f"wrote {out / 'features.npz'} ({rows}x{cols} cells x {n} features) and {out / 'result.json'}")
    return record


def run_auroc(args) -> dict:
    from .probe import attribute_auroc

    if args.n_select < 1 or args.n_eval < 1:
        raise UserInputError(f"--n-select and --n-eval must be at least 1, got {args.n_select} and {args.n_eval}")
    _, config = load_sae(args.sae)
    model_name = args.model or config["metadata"].get("model_name") or DEFAULT_MODEL
    loaded = load_model(model_name, device=args.device)
    result = {"model": model_name, "sae": str(args.sae), **attribute_auroc(loaded, load_sae_for(loaded, args.sae),
                                                                           args.n_select, args.n_eval)}
    with staged_folder(Path(args.out)) as staging:
        (staging / "auroc.json").write_text(json.dumps(result, indent=2))
    print(f"{result['hook_name']}: per attribute, the feature chosen on {args.n_select} held-out scenes and its AUROC "
          f"on {args.n_eval} more (object cells of that attribute vs other objects' cells)")
    print("| attribute | feature | AUROC (chosen on) | AUROC (held out) |\n|---|---|---|---|")
    for name, row in result["attributes"].items():
        print(f"| {name} | {row['feature']} | {row['auroc_select']:.3f} | {row['auroc']:.3f} |")
    return result


def run_steering(args) -> dict:
    from .format import resolve_sae_path
    from .steering import steering_study

    if args.n_scenes < 1:
        raise UserInputError(f"--n-scenes must be at least 1, got {args.n_scenes}")
    auroc_path = Path(args.auroc) if args.auroc else resolve_sae_path(args.sae) / "auroc.json"
    if not auroc_path.is_file():
        raise UserInputError(f"no {auroc_path}: run `sae auroc --sae {args.sae} --out DIR` and give --auroc "
                             "DIR/auroc.json")
    try:
        features = {name: int(row["feature"]) for name, row in json.loads(auroc_path.read_text())["attributes"].items()}
    except (ValueError, KeyError, TypeError):
        raise UserInputError(f"{auroc_path} is not an auroc.json written by `sae auroc`") from None
    _, config = load_sae(args.sae)
    model_name = args.model or config["metadata"].get("model_name") or DEFAULT_MODEL
    loaded = load_model(model_name, device=args.device)
    result = {"model": model_name, "sae": str(args.sae),
              **steering_study(loaded, load_sae_for(loaded, args.sae), features, args.n_scenes)}
    with staged_folder(Path(args.out)) as staging:
        (staging / "steering.json").write_text(json.dumps(result, indent=2))
    print(f"{result['hook_name']}: {result['n_questions']} colour questions of {args.n_scenes} held-out scenes "
          f"answered correctly ({result['skipped_wrong_clean_answer']} others left out)")
    print("| edit (on the object's cells unless said) | answer changed | answer became the target colour |\n"
          "|---|---|---|")
    for name, row in result["edits"].items():
        target = "" if row["to_target"] is None else f"{row['to_target']} / {row['n']} (" + ", ".join(
            f"{colour} {hits} / {tried}" for colour, (hits, tried) in row["by_target"].items()) + ")"
        print(f"| {name} | {row['changed']} / {row['n']} | {target} |")
    return result


def run(args):
    return {"train": run_train, "encode": run_encode, "auroc": run_auroc,
            "steering": run_steering}[args.sae_command](args)
