"""How often a policy's samples are right on GRPO's training problems (or the held-out
ones), by the reference solution's number of steps (the `steps` curriculum's
difficulty) and by temperature: the signal GRPO has to work with before it is spent.

For each step count, a seeded choice of training problems (never the held-out or test
splits) gets G samples at each temperature (greedy: one), at GRPO's token budget, with
the preset's prompt; each is scored by the correctness reward. Prints the share right,
the groups with a right and a wrong answer ("spread": the only groups whose
correctness advantages are not all zero), the samples that reach a milestone of the
reference solution (``rewards.progress`` > 0) and the groups whose progress differs,
the mean completion length, the share cut by the budget and the seconds taken.

With ``--given K``, the prompt also carries the reference solution's first K steps
(at most all but the last) in the trace format, as a reverse curriculum (R3, Xi et
al., 2024) would start GRPO: the policy writes the rest, and the hint and its
continuation are scored together. It asks whether hints would give GRPO a signal the
bare problems do not.

With ``--split held-out --samples 16``, the problems come from the held-out validation
split instead and get 16 samples each: "any right" is then pass@16, the share of
problems the policy solves in some sample, which bounds what sharpening by RL can
turn into greedy accuracy (Yue et al., 2025: RL raises pass@1 towards the base
policy's pass@k, not past it).

    python bench/pass_rate.py --model runs/cpu-demo/sft/export/merged \\
        [--preset runs/cpu-demo/config.yaml] [--steps 2 3] [--problems 48] [--temperatures 0 0.9 0.7] [--given 0 1 2]
        [--split held-out] [--samples 16]
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model name or a merged export (an SFT run's export/merged)")
    parser.add_argument("--preset", default="cpu-demo", help="preset or saved config.yaml: prompt style, G, token budget")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 3], help="reference solutions' step counts to sample")
    parser.add_argument("--problems", type=int, default=48, help="problems per step count")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.9, 0.7], help="0: greedy, one sample")
    parser.add_argument("--seed", type=int, default=7, help="the choice of problems")
    parser.add_argument("--given", type=int, nargs="+", default=[0],
                        help="reference steps written into the prompt (at most all but the last): 0 = none")
    parser.add_argument("--split", choices=["train", "held-out"], default="train",
                        help="GRPO's training problems, or the held-out validation split (never the test split)")
    parser.add_argument("--samples", type=int, default=0, help="samples per problem and temperature (0: the preset's G)")
    args = parser.parse_args()
    if min(args.given) < 0:
        parser.error("--given counts reference steps: 0 or more")

    from tracetune.config import load_config
    from tracetune.data import solution_steps
    from tracetune.format import REASONING_OPEN, build_prompt, numbered_steps
    from tracetune.generate import Generator, SamplingConfig
    from tracetune.grpo import prompt_examples, reference_steps
    from tracetune.models.registry import load_model
    from tracetune.rewards import correctness, progress

    config = load_config(args.preset)
    loaded = load_model(args.model)
    train, held_out = prompt_examples(config, loaded.tokenizer)  # the held-out problems are not among GRPO's
    problems = train if args.split == "train" else held_out
    rng = random.Random(args.seed)
    picked = {}
    for steps in args.steps:
        pool = [e for e in problems if reference_steps(e) == steps]
        if len(pool) < args.problems:
            raise SystemExit(f"--problems {args.problems}: only {len(pool)} {args.split} problems have {steps} reference steps")
        picked[steps] = rng.sample(pool, args.problems)
    generator = Generator(loaded.model, loaded.tokenizer)
    G = args.samples or config.grpo.num_generations

    def hint(example, given: int) -> str:  # the reference's first steps, as the trace would begin
        steps = solution_steps(example.solution)[:given]
        return REASONING_OPEN + "".join(f"{line}\n" for line in numbered_steps(steps)) if steps else ""

    print(f"{'T':>4} {'steps':>5} {'given':>5} {'right':>12} {'spread':>10} {'any right':>10} {'reached':>12} "
          f"{'p. spread':>10} {'length':>7} {'cut':>6} {'seconds':>8}")
    cells = [(steps, examples, given) for steps, examples in picked.items()
             for given in sorted({min(k, steps - 1) for k in args.given}, reverse=True)]
    for temperature in args.temperatures:
        n = 1 if temperature == 0 else G
        for steps, examples, given in cells:
            rows = [e for e in examples for _ in range(n)]
            hints = [h for e in examples for h in [hint(e, given)] * n]  # one parse per problem, as rows repeat them
            prompts = [build_prompt(e.question, config.data.prompt_style, e.kind) + h for e, h in zip(rows, hints)]
            start = time.perf_counter()
            generations = generator.generate(prompts, SamplingConfig(max_new_tokens=config.grpo.max_new_tokens,
                                                                     temperature=temperature, seed=config.grpo.seed))
            seconds = time.perf_counter() - start
            right = [correctness(h + g.text, e.reference, e.kind, e.choices or None) == 1.0
                     for h, g, e in zip(hints, generations, rows)]
            groups = [right[i * n:(i + 1) * n] for i in range(len(examples))]
            spread = sum(1 for g in groups if any(g) and not all(g))
            ways = [progress(h + g.text, e.question, e.solution) or 0.0 for h, g, e in zip(hints, generations, rows)]
            reached = sum(w > 0 for w in ways)
            progress_spread = sum(1 for i in range(len(examples)) if len(set(ways[i * n:(i + 1) * n])) > 1)
            length = sum(len(g.token_ids) for g in generations) / len(generations)
            cut = sum(g.finish_reason == "length" for g in generations) / len(generations)
            print(f"{temperature:>4g} {steps:>5} {given:>5} {sum(right):>5} / {len(right):<4} {spread:>4} / {len(groups):<3} "
                  f"{sum(1 for g in groups if any(g)):>10} {reached:>5} / {len(ways):<4} {progress_spread:>4} / {len(groups):<3} "
                  f"{length:>7.1f} {cut:>6.1%} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
