"""Every private Tunix name tracetune relies on still exists (tunix_names.NAMES)."""

from tracetune import tunix_names
from tracetune.tunix_names import Name


def test_every_tunix_name_tracetune_relies_on_is_still_there():
    gone = tunix_names.missing()
    assert not gone, "a Tunix upgrade removed names tracetune relies on:\n" + "\n".join(
        f"  {n.owner}.{n.name} ({n.kind}): {n.use}" for n in gone)


def test_the_check_notices_a_removed_name():
    fake = (Name("tunix.rl.rl_learner:RLLearner", "_no_such_method", "method", "-"),
            Name("tunix.rl.rl_learner:RLLearner", "_no_such_attribute", "attribute", "-"),
            Name("tunix.rl.no_such_module:X", "y", "method", "-"),
            Name("tunix.rl.algo_core:grpo_loss_fn", "no such text", "source", "-"))
    assert tunix_names.missing(fake) == list(fake)
