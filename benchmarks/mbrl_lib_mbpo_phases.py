"""mbrl-lib 0.2.0's MBPO building blocks timed at the settings of `mbpo_throughput.py`.

Not part of this library and not in requirements.txt: it runs in the PyTorch + mbrl-lib
virtualenv described in `mbrl_lib_pets_latency.py`, and `mbpo_throughput.py --mbrl-lib-python
<that venv's python>` runs it before its own timings, so both come from one run.

Timed (best of `--repeats` blocks after a warm-up block, per call):
* one SAC update: mbrl-lib's SAC (`mbrl.third_party.pytorch_sac_pranz24.sac.SAC`, what its MBPO
  trains) `update_parameters` on a batch of 256 from an `mbrl.util.ReplayBuffer`, with our
  hopper settings (2 x 256 hidden, automatic entropy tuning with target -1, target networks
  updated every step with tau 5e-3, Adam 3e-4; obs 12, actions 3 as `envs.make("hopper")`);
* one ensemble SGD step: `OneDTransitionRewardModel(GaussianMLP)` with 7 members of 4 x 200 SiLU
  predicting (delta obs, reward), `model.update(batch, optimizer)` on a (7, 256) batch (one
  bootstrap minibatch per member, as mbrl-lib's `ModelTrainer` feeds it), Adam 1e-3.
Prints one JSON line (milliseconds per call).
"""

import argparse
import json
import time
import types

import gymnasium as gym
import mbrl
import mbrl.types
import mbrl.util
import numpy as np
import torch
from mbrl.third_party.pytorch_sac_pranz24.sac import SAC
from mbrl_lib_pets_latency import gaussian_mlp_ensemble  # the same ensemble construction, one place

OBS_SIZE, ACTION_SIZE, BATCH, MEMBERS = 12, 3, 256, 7  # hopper, as envs.make("hopper")


def best_ms(fn, calls, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    cli = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_SIZE,), np.float32)

    buffer = mbrl.util.ReplayBuffer(10_000, (OBS_SIZE,), (ACTION_SIZE,), rng=rng)
    n = 10_000
    buffer.add_batch(rng.normal(size=(n, OBS_SIZE)).astype(np.float32),
                     rng.uniform(-1, 1, (n, ACTION_SIZE)).astype(np.float32),
                     rng.normal(size=(n, OBS_SIZE)).astype(np.float32), rng.normal(size=n).astype(np.float32),
                     np.zeros(n, bool), np.zeros(n, bool))
    sac_args = types.SimpleNamespace(gamma=0.99, tau=5e-3, alpha=0.2, policy="Gaussian", target_update_interval=1,
                                     automatic_entropy_tuning=True, target_entropy=-1.0, hidden_size=256,
                                     device="cpu", lr=3e-4)
    agent = SAC(OBS_SIZE, action_space, sac_args)
    updates = iter(range(10**9))
    sac_ms = best_ms(lambda: agent.update_parameters(buffer, BATCH, next(updates)), cli.calls, cli.repeats)

    model = gaussian_mlp_ensemble(OBS_SIZE, ACTION_SIZE, members=MEMBERS, propagation="random_model",
                                  learned_rewards=True)
    model.update_normalizer(buffer.get_all())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    member_batches = [buffer.sample(BATCH) for _ in range(MEMBERS)]
    batch = mbrl.types.TransitionBatch(*[np.stack(fields) for fields in zip(*[b.astuple() for b in member_batches])])
    model_ms = best_ms(lambda: model.update(batch, optimizer), cli.calls, cli.repeats)
    print(json.dumps({"mbrl_version": mbrl.__version__, "torch_version": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "sac_update_ms": sac_ms, "ensemble_step_ms": model_ms}))


if __name__ == "__main__":
    main()
