"""mbrl-lib 0.2.0's PETS planner timed at the same settings as `pets_latency.py`, on this machine.

Not part of this library and not in requirements.txt: it runs in its own virtualenv with PyTorch
and mbrl-lib, and `pets_latency.py --mbrl-lib-python <that venv's python>` runs it just before
timing our planner, so both figures come from one run. To set that virtualenv up (Python 3.11):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 "hydra-core==1.3.2" "omegaconf==2.3.0" \\
        termcolor "gymnasium==0.26.3" tqdm matplotlib
    /tmp/torchenv/bin/pip install --no-deps mbrl==0.2.0

(mbrl 0.2.0 pins hydra-core 1.0.3, which does not import on Python 3.11; 1.3.2 works for the
parts used here. `--no-deps` skips its jupyter/tensorboard/pytest/sk-video requirements, which
planning does not import.)

What is timed: `TrajectoryOptimizerAgent.act(obs)` (one MPC step: a full CEM optimization over
`ModelEnv.evaluate_action_sequences`), built the way mbrl-lib's own PETS example builds it
(`create_one_dim_tr_model`, `ModelEnv`, `create_trajectory_optim_agent_for_model`), with:
the settings pets_latency.py passes (halfcheetah's preset: CEM population 500, elite ratio 0.1), 5 iterations, alpha 0.1, horizon 30, 20
particles, propagation `fixed_model` (TS-inf), a `GaussianMLP` ensemble of 5 members of 4 x 200
SiLU, halfcheetah's obs 18 / actions 6 in [-1, 1], mbrl-lib's `halfcheetah` reward function and
`no_termination`, freshly initialized weights and an identity-ish normalizer fit on random
data (planning cost does not depend on either). Best of `--repeats` calls after a warm-up, and
the dense fp32 matmul rate of PyTorch at 2048^3 in the same process. Prints one JSON line.
"""

import argparse
import json
import time

import gymnasium as gym
import mbrl
import mbrl.env.reward_fns
import mbrl.env.termination_fns
import mbrl.models
import mbrl.planning
import mbrl.types
import mbrl.util.common
import numpy as np
import omegaconf
import torch

OBS_SIZE, ACTION_SIZE = 18, 6  # halfcheetah, as envs.make("halfcheetah")


class BoxSpacesEnv(gym.Env):
    """Only the spaces: ModelEnv reads them; nothing here is stepped."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_SIZE,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_SIZE,), np.float32)


def gaussian_mlp_ensemble(obs_size, action_size, members, propagation, learned_rewards):
    """mbrl-lib's probabilistic ensemble (4 x 200 SiLU GaussianMLP, delta targets, normalized inputs)
    built through its own `create_one_dim_tr_model`, as its PETS and MBPO examples build it."""
    cfg = omegaconf.OmegaConf.create({
        "dynamics_model": {
            "_target_": "mbrl.models.GaussianMLP", "device": "cpu", "num_layers": 4, "ensemble_size": members,
            "hid_size": 200, "in_size": "???", "out_size": "???", "deterministic": False,
            "propagation_method": propagation, "learn_logvar_bounds": False,
            "activation_fn_cfg": {"_target_": "torch.nn.SiLU"},
            "_recursive_": False},  # hydra 1.3 would build the activation too early (1.0.3 did not)
        "algorithm": {"learned_rewards": learned_rewards, "target_is_delta": True, "normalize": True,
                      "normalize_double_precision": True},
        "overrides": {}})
    return mbrl.util.common.create_one_dim_tr_model(cfg, (obs_size,), (action_size,))


def matmul_flops_per_s(n=2048, chain=20):
    """PyTorch's dense fp32 matmul rate: best of 3 chains of `chain` (n, n) products."""
    a = torch.randn(n, n)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x = a
        for _ in range(chain):
            x = (x @ a) * (1.0 / n)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * chain / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=400)
    parser.add_argument("--elite-ratio", type=float, default=0.1)
    parser.add_argument("--horizon", type=int, default=30)
    parser.add_argument("--particles", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    cli = parser.parse_args()
    torch.manual_seed(0)
    env = BoxSpacesEnv()
    model = gaussian_mlp_ensemble(OBS_SIZE, ACTION_SIZE, members=5, propagation="fixed_model", learned_rewards=False)
    rng = np.random.default_rng(0)
    model.update_normalizer(mbrl.types.TransitionBatch(
        rng.normal(size=(1000, OBS_SIZE)).astype(np.float32), rng.uniform(-1, 1, (1000, ACTION_SIZE)).astype(np.float32),
        None, None, None, None))
    model_env = mbrl.models.ModelEnv(env, model, mbrl.env.termination_fns.no_termination,
                                     mbrl.env.reward_fns.halfcheetah, generator=torch.Generator().manual_seed(0))
    agent_cfg = omegaconf.OmegaConf.create({
        "_target_": "mbrl.planning.TrajectoryOptimizerAgent", "action_lb": [-1.0] * ACTION_SIZE,
        "action_ub": [1.0] * ACTION_SIZE, "planning_horizon": cli.horizon, "replan_freq": 1, "verbose": False,
        "optimizer_cfg": {"_target_": "mbrl.planning.CEMOptimizer", "num_iterations": cli.iterations,
                          "elite_ratio": cli.elite_ratio, "population_size": cli.population, "alpha": 0.1,
                          "device": "cpu", "lower_bound": "???", "upper_bound": "???",
                          "return_mean_elites": True, "clipped_normal": False},
        "_recursive_": False})  # the agent fills the optimizer's bounds before building it, as in hydra 1.0.3
    agent = mbrl.planning.create_trajectory_optim_agent_for_model(model_env, agent_cfg, num_particles=cli.particles)
    obs = rng.normal(size=OBS_SIZE).astype(np.float32)
    agent.act(obs)  # warm-up
    times = []
    for _ in range(cli.repeats):
        start = time.perf_counter()
        action = agent.act(obs)
        times.append(time.perf_counter() - start)
    print(json.dumps({"mbrl_version": mbrl.__version__, "torch_version": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "seconds_per_step": min(times),
                      "all_seconds": times, "action_finite": bool(np.all(np.isfinite(action))),
                      "matmul_flops_per_s": matmul_flops_per_s()}))


if __name__ == "__main__":
    main()
