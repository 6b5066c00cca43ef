"""`python -m training <step>`: train, export, evaluate, register, run (all four), compare, teacher."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.backbones import BACKBONES, WeightsUnavailable, seed_hub_cache
from training.recipe import DISTILL_CHOICES, KD_TEACHERS, PROFILES, recipe_from_args

STEPS = ("train", "export", "evaluate", "register", "run", "compare", "teacher")
STEPS_READING_DATA = ("train", "export", "evaluate", "run", "compare", "teacher")  # `register` reads the run only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--data", type=Path,
                        help=f"dataset folder written by data_prep (needed by {', '.join(STEPS_READING_DATA)})")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="where this run's files go")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    profile_archs = ", ".join(f"profile {name}: {recipe.arch}" for name, recipe in PROFILES.items())
    parser.add_argument("--arch", choices=list(BACKBONES), help=f"backbone (default: the profile's; {profile_archs})")
    parser.add_argument("--archs", nargs="+", choices=list(BACKBONES), default=list(BACKBONES), metavar="ARCH",
                        help="backbones for `compare` (default: all of --arch's choices, in that order)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--views", type=int, help="cached views per training image (1 centre + augmented)")
    parser.add_argument("--stem-blocks", type=int, help="freeze the first N blocks (default: the architecture's cut)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-per-class", type=int)
    parser.add_argument("--weights-dir", type=Path, help="folder of torchvision *.pth files to seed the hub cache with")
    parser.add_argument("--random-init", action="store_true", help="train from random weights (explicitly no ImageNet)")
    parser.add_argument("--int8", action="store_true",
                        help="also quantize to INT8 and serve it if faster and as accurate")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--no-register", action="store_true", help="`run` without saving into the model store")
    parser.add_argument("--model-name", default="room_classifier",
                        help="`run`/`register`: the model-store name to add a version to (the service serves "
                             "RC_MODEL_TAG, room_classifier:latest by default; e.g. room_classifier_scene for the "
                             "scene network beside it)")
    parser.add_argument("--register-if-val-above", type=float,
                        help="`run`: register only if the served model's val accuracy beats this "
                             "(e.g. today's model's)")
    kd = parser.add_argument_group("distillation from the Places365 teacher (needs places365/ in --weights-dir "
                                   "or a network)")
    kd.add_argument("--kd-alpha", type=float, help="weight of the distillation term (0 = plain cross-entropy)")
    kd.add_argument("--kd-temperature", type=float, help="softmax temperature of the distillation term")
    kd.add_argument("--kd-scene-weight", type=float,
                    help="weight of the all-365-scenes term (an auxiliary head, not exported; 0 = off)")
    kd.add_argument("--kd-teacher", choices=KD_TEACHERS,
                    help="the teacher's belief the student learns: zero_shot (its grouped scenes) or fine_tuned "
                         "(a linear head fitted on its scene outputs, cross-fitted on the training photos)")
    kd.add_argument("--soft-target-dir", type=Path, help="soft-target cache (default: $TORCH_HOME/soft_targets)")
    kd.add_argument("--distill", choices=DISTILL_CHOICES, default="both", help="`compare`: students without/with KD")
    kd.add_argument("--no-teacher-row", action="store_true", help="`compare`: leave out the teacher's row")
    args = parser.parse_args(argv)
    if args.data is None and args.step in STEPS_READING_DATA:
        parser.error(f"the {args.step} step needs --data DIR (the dataset folder written by data_prep)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training import compare, distill, pipeline  # after argument parsing: `--help` stays fast

    if args.weights_dir is not None and args.weights_dir.is_dir():
        seed_hub_cache(args.weights_dir)
    recipe = recipe_from_args(args.profile, arch=args.arch, epochs=args.epochs, views=args.views,
                              stem_blocks=args.stem_blocks, seed=args.seed,
                              max_per_class=args.max_per_class,
                              pretrained=False if args.random_init else None,
                              kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature,
                              kd_scene_weight=args.kd_scene_weight, kd_teacher=args.kd_teacher)
    teacher_args = {"weights_dir": args.weights_dir, "soft_target_dir": args.soft_target_dir}
    try:
        if args.step == "train":
            pipeline.train_step(args.data, args.run_dir, recipe, resume=args.resume, **teacher_args)
        elif args.step == "export":
            pipeline.export_step(args.data, args.run_dir)
        elif args.step == "evaluate":
            pipeline.evaluate_step(args.data, args.run_dir, int8=args.int8)
        elif args.step == "register":
            pipeline.register_step(args.run_dir, args.model_name)
        elif args.step == "run":
            pipeline.run_all(args.data, args.run_dir, recipe, int8=args.int8, register=not args.no_register,
                             resume=args.resume, register_if_val_above=args.register_if_val_above,
                             model_name=args.model_name, **teacher_args)
        elif args.step == "teacher":
            distill.teacher_report(args.data, args.weights_dir, args.run_dir, args.soft_target_dir)
        else:
            compare.compare(args.data, args.run_dir, args.archs, recipe, args.distill, not args.no_teacher_row,
                            **teacher_args)
    except (WeightsUnavailable, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
