"""``compactvl chat``: one image + one prompt → answer, from a saved model or from pretrained parts."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="answer a prompt about an image",
        description="Answer a prompt about an image. With --model, loads a saved compactvl model; otherwise "
        "assembles one from pretrained parts (--lm, --encoder) whose projector is UNTRAINED, so the answer only shows "
        "that the pipeline runs end to end (train one with `compactvl train` or `./run demo`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  compactvl chat --model runs/demo --image scene.png --prompt \"What color is the circle?\"\n"
               "      (runs/demo: a run directory; its model is found inside it)\n"
               "  compactvl chat --image a.png --image b.png --prompt \"<image> or <image>: which is larger?\"",
    )
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--prompt", required=True, help="the question; '<image>' marks where each image goes "
                   "(added in front when missing)")
    p.add_argument("--model", help="directory written by save_pretrained / compactvl train, or 'reference' (the "
                   "committed reference model)")
    p.add_argument("--lm", default="smollm2-135m-instruct", help="LM name or path (without --model)")
    p.add_argument("--encoder", action="append", help="encoder name or path (without --model; default dinov2-small)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch  # on demand: --help stays fast

    from ..images import load_image  # on demand: --help stays fast
    from ..model import CompactVLM  # on demand: --help stays fast

    images = [load_image(p) for p in args.image]  # fail fast, before loading any model
    torch.manual_seed(args.seed)
    if args.model:
        from ..reference import resolve  # on demand: --help stays fast

        model = CompactVLM.from_pretrained(resolve(args.model))
    else:
        print("note: no --model given; the projector is untrained, so answers do not reflect the image yet",
              file=sys.stderr)
        model = CompactVLM.build(lm=args.lm, encoders=args.encoder or ["dinov2-small"])
    model.eval()
    prompt = args.prompt
    tok = model.config.image_token
    missing = len(args.image) - prompt.count(tok)
    if missing > 0:
        prompt = f"{tok}\n" * missing + prompt
    kw = dict(do_sample=True, temperature=args.temperature) if args.sample else {}
    answer = model.generate([prompt], [images], max_new_tokens=args.max_new_tokens, **kw)[0]
    print(answer)
    return 0
