"""The adapter depends on the total batch only: one process with accumulation, two processes and two nodes
train the same adapter, and a checkpoint of one layout resumes on another (issue 23).

The runs compared start from one saved initial adapter, so "how far training moved the weights" can be
measured, and each difference is compared with it."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import train_t2i_adapter_sdxl as train
from helpers import load_adapter_weights, max_weight_difference, run_training, training_argv
from t2i_train import lifecycle, loader
from test_robustness import load_adapter_weights_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 32 samples and a total batch of 4: 8 steps an epoch, so 10 steps cross into the second epoch; the
# checkpoint at step 5 is mid-epoch. Random flips, empty prompts and a warm-up with cosine decay draw
# from each sample's seed and count optimisation steps.
FLAGS = ["--max_train_steps", 10, "--checkpointing_steps", 5, "--random_flip", "--proportion_empty_prompts", 0.25,
         "--lr_scheduler", "cosine", "--lr_warmup_steps", 3, "--train_batch_size", 2]
ONE_PROCESS = ["--gradient_accumulation_steps", 2]  # 1 × 2 × 2 = 4; on two processes 2 × 2 × 1 = 4
MOST_DIFFERENCE = 0.01  # of how far training moved the weights


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(nodes, argv_of_node, weights_dir, processes_per_node=1, script=os.path.join(ROOT, "tests", "ddp_worker.py")):
    """Run `script` under torchrun (gloo on CPU) as `nodes` nodes on this machine, each with `processes_per_node`
    processes and the command line `argv_of_node(node)`; returns each launcher's exit code and log."""
    os.makedirs(weights_dir, exist_ok=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "RANK_WEIGHTS_DIR": str(weights_dir), "OMP_NUM_THREADS": "1"}
    port = free_port()
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
             "--nproc_per_node", str(processes_per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             script, *map(str, argv_of_node(node))],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in range(nodes)
    ]
    logs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    return [launcher.returncode for launcher in launchers], logs


def launch(nodes, argv_of_node, weights_dir, processes_per_node=1):
    """Train as `run_nodes` does; returns rank 0's adapter and the launchers' logs. Every rank must hold the
    same adapter."""
    codes, logs = run_nodes(nodes, argv_of_node, weights_dir, processes_per_node)
    for code, log in zip(codes, logs):
        assert code == 0, log[-3000:]
    world = nodes * processes_per_node
    ranks = [load_adapter_weights_file(weights_dir / f"rank{rank}.safetensors") for rank in range(world)]
    assert all(max_weight_difference(ranks[0], rank) == 0 for rank in ranks[1:]), "the ranks hold different adapters"
    return ranks[0], logs


@pytest.fixture(scope="module")
def initial_adapter(tiny_sdxl, fill_data, tmp_path_factory):
    """A new adapter for the tiny model, saved: every run here starts from it."""
    import torch
    from diffusers import T2IAdapter

    config = train.check_inputs(train.parse_args(training_argv(tiny_sdxl, fill_data, "unused")))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("initial-adapter")
    T2IAdapter.from_config(config).save_pretrained(folder)
    return folder


def argv(tiny_sdxl, fill_data, initial_adapter, output_dir, *extra):
    return training_argv(tiny_sdxl, fill_data, output_dir, *FLAGS, "--adapter_model_name_or_path", initial_adapter,
                         *extra)


@pytest.fixture(scope="module")
def layouts(tiny_sdxl, fill_data, initial_adapter, tmp_path_factory):
    """The same run (total batch 4) on 1 process × batch 2 × accumulation 2 and on 2 processes × batch 2."""
    work = tmp_path_factory.mktemp("layouts")
    run_training(argv(tiny_sdxl, fill_data, initial_adapter, work / "one", *ONE_PROCESS))
    two, _ = launch(1, lambda node: argv(tiny_sdxl, fill_data, initial_adapter, work / "two"), work / "w-two",
                    processes_per_node=2)
    return {"work": work, "one": load_adapter_weights(work / "one"), "two": two,
            "moved": max_weight_difference(load_adapter_weights(initial_adapter), load_adapter_weights(work / "one"))}


def relative_difference(a, b, layouts):
    """The largest weight difference as a share of how far training moved the weights (printed for the record)."""
    difference = max_weight_difference(a, b)
    print(f"max difference {difference:.3g}, {100 * difference / layouts['moved']:.4f}% of the largest move"
          f" ({layouts['moved']:.3g})")
    return difference / layouts["moved"]


def test_the_plan_of_each_step_depends_on_the_total_batch_only():
    """1 × 4, 1 × 2 with 2 accumulation steps, 2 × 2 and 4 × 1: each optimisation step trains the same samples
    (targets and seeds too), each epoch every sample at most once; an incomplete total batch of a bucket is
    left out."""
    targets = [(64, 64)] * 21 + [(32, 128)] * 10
    layouts = {(1, 4), (1, 2), (2, 2), (4, 1)}  # (processes, batch): the accumulation makes up the total of 4

    def steps(processes, batch, epoch):
        samplers = [loader.PlannedBatchSampler(targets, 4, batch, seed=7, rank=rank, world_size=processes)
                    for rank in range(processes)]
        for sampler in samplers:
            sampler.load_state_dict({"epoch": epoch, "done": 0})
        streams = [iter(sampler) for sampler in samplers]
        micro_batches = samplers[0].micro_batches
        assert samplers[0].steps_per_epoch() == len(samplers[0].epoch_plan(epoch))
        return [sorted(sample for stream in streams for _ in range(micro_batches) for sample in next(stream))
                for _ in range(samplers[0].steps_per_epoch())]

    for epoch in (0, 1):
        plans = [steps(*layout, epoch) for layout in layouts]
        assert all(plan == plans[0] for plan in plans[1:])
        assert len(plans[0]) == 5 + 2  # 21 // 4 and 10 // 4 full total batches
        rows = [row for step in plans[0] for row, _, _ in step]
        assert len(rows) == len(set(rows)) == 28
        assert all(len({target for _, target, _ in step}) == 1 for step in plans[0])
    assert steps(2, 2, 0) != steps(2, 2, 1)  # each epoch planned anew


def test_a_sample_draws_the_same_noise_and_timestep_in_any_batch():
    seeds = [3, 2**62 + 5, 11]
    alone = [train.draw_sample_noise([seed], (4, 8, 8), 1000) for seed in seeds]
    together = train.draw_sample_noise(seeds, (4, 8, 8), 1000)
    for index, drawn in enumerate(alone):
        for single, batched in zip(drawn, together):
            assert (single[0] == batched[index]).all()
    assert not (together[2][0] == together[2][1]).all()  # each sample its own


def test_one_process_with_accumulation_and_two_processes_train_the_same_adapter(layouts):
    """Total batch 4: 1 process × 2 × accumulation 2 and 2 processes × 2, with flips, empty prompts and a
    warm-up: the same adapter within float rounding (upstream, and this trainer before, drew noise,
    timesteps and prompts from each process's own random stream and trained different adapters)."""
    assert relative_difference(layouts["one"], layouts["two"], layouts) <= MOST_DIFFERENCE
    assert layouts["moved"] > 0


def test_two_nodes_train_the_adapter_of_two_processes_on_one(layouts, tiny_sdxl, fill_data, initial_adapter):
    """2 nodes × 1 process (torchrun --nnodes 2 on localhost), sharing the output folder but each with a
    node-local --cache_dir: the same adapter as 2 processes on one node. The main process alone locks the
    folder, writes the checkpoints, the finished marker and the logs; each node checks the samples once
    (its record is in its own cache)."""
    work = layouts["work"]
    nodes, logs = launch(2, lambda node: argv(tiny_sdxl, fill_data, initial_adapter, work / "nodes", "--cache_dir",
                                              work / f"node-{node}-cache"), work / "w-nodes")
    assert relative_difference(nodes, layouts["two"], layouts) <= MOST_DIFFERENCE
    assert all("Num processes: 2" in log for log in logs)
    for node in (0, 1):
        assert list((work / f"node-{node}-cache").rglob("t2i_sample_check-*.json")), f"node {node} kept no record"
    assert sorted(path.name for path in (work / "nodes").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert json.loads((work / "nodes" / lifecycle.FINISHED_FILE).read_text())["step"] == 10
    assert not list((work / "nodes").glob("*.tmp")) and not (work / "nodes" / lifecycle.LOCK_FILE).exists()
    assert sorted(os.listdir(work / "nodes" / "checkpoint-5")).count(lifecycle.DATA_STATE_FILE) == 1


def test_an_output_folder_local_to_each_node_is_refused_before_anything_loads(tiny_sdxl, fill_data, initial_adapter,
                                                                              tmp_path):
    """Two nodes whose `--output_dir` is not one folder (here: another folder per node, as a node-local disk
    mounted at the same path would be): the main process alone would write the checkpoints, so node 1 could
    never resume them. Both stop at once with one message naming the process that cannot see the folder, and
    neither folder is left behind."""
    codes, logs = run_nodes(2, lambda node: argv(tiny_sdxl, fill_data, initial_adapter, tmp_path / f"out-{node}",
                                                 "--cache_dir", tmp_path / f"cache-{node}"), tmp_path / "weights",
                            script=os.path.join(ROOT, "train_t2i_adapter_sdxl.py"))
    output = "".join(logs)
    assert codes[0] != 0 and codes[1] != 0
    assert output.count("is not one folder for every process: process 1 on") == 1, output[-3000:]
    assert "Traceback" not in output.split("is not one folder")[0]
    assert "Loading" not in output and "Steps" not in output  # stopped before the models or any step
    assert not (tmp_path / "out-0").exists() and not (tmp_path / "out-1").exists()


def test_a_two_process_checkpoint_resumes_on_one_process(layouts, tiny_sdxl, fill_data, initial_adapter):
    """The 2-process run's checkpoint at step 5 (one data state, no per-rank file needed), resumed on 1 process ×
    accumulation 2 with a DataLoader worker: it ends at the adapter both layouts train straight."""
    work = layouts["work"]
    shutil.copytree(work / "two" / "checkpoint-5", work / "two-to-one" / "checkpoint-5")
    assert run_training(argv(tiny_sdxl, fill_data, initial_adapter, work / "two-to-one", *ONE_PROCESS,
                             "--dataloader_num_workers", 1, "--resume_from_checkpoint", "latest")) == 10
    resumed = load_adapter_weights(work / "two-to-one")
    assert relative_difference(resumed, layouts["one"], layouts) <= MOST_DIFFERENCE
    assert relative_difference(resumed, layouts["two"], layouts) <= MOST_DIFFERENCE


def test_a_one_process_checkpoint_resumes_on_two_processes(layouts, tiny_sdxl, fill_data, initial_adapter):
    """The 1-process run's checkpoint at step 5 has no random_states_1.pkl: 2 processes resume it (this trainer
    refused before) and end at the adapter both layouts train straight."""
    work = layouts["work"]
    shutil.copytree(work / "one" / "checkpoint-5", work / "one-to-two" / "checkpoint-5")
    assert not (work / "one-to-two" / "checkpoint-5" / "random_states_1.pkl").exists()
    resumed, _ = launch(1, lambda node: argv(tiny_sdxl, fill_data, initial_adapter, work / "one-to-two",
                                             "--resume_from_checkpoint", "latest"), work / "w-one-to-two",
                        processes_per_node=2)
    assert relative_difference(resumed, layouts["one"], layouts) <= MOST_DIFFERENCE
    assert relative_difference(resumed, layouts["two"], layouts) <= MOST_DIFFERENCE


@pytest.mark.parametrize(("batch", "accumulation", "advice"), [
    (4, 2, r"pass --gradient_accumulation_steps 1\."),
    (3, 1, r"choose --train_batch_size and --gradient_accumulation_steps whose product with 1 process\(es\) is 4"),
])
def test_another_total_batch_on_resume_is_refused_naming_what_keeps_it(layouts, tiny_sdxl, fill_data,
                                                                       initial_adapter, monkeypatch, batch,
                                                                       accumulation, advice, tmp_path):
    """A requeue with another total batch (here 8 or 3 for the checkpoint's 4) stops before any model loads,
    naming both totals and the flags that continue the checkpoint exactly; nothing in the folder changes."""
    shutil.copytree(layouts["work"] / "one" / "checkpoint-5", tmp_path / "checkpoint-5")
    before = sorted(os.listdir(tmp_path / "checkpoint-5"))
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(ValueError, match=rf"with a total batch of {batch * accumulation} .* it trained with a total"
                                         rf" batch of 4.* To continue it exactly, {advice}"):
        run_training(argv(tiny_sdxl, fill_data, initial_adapter, tmp_path, "--train_batch_size", batch,
                          "--gradient_accumulation_steps", accumulation, "--resume_from_checkpoint", "latest"))
    assert sorted(os.listdir(tmp_path / "checkpoint-5")) == before


def test_the_schedule_continues_by_optimisation_steps(layouts):
    """The LR schedule's state counts optimisation steps whatever the process count, so a checkpoint's
    schedule continues on another (it counted scheduler calls, steps × processes)."""
    import torch

    for layout in ("one", "two"):
        state = torch.load(layouts["work"] / layout / "checkpoint-5" / "scheduler.bin", weights_only=True)
        assert state["last_epoch"] == 5
    data_states = [json.loads((layouts["work"] / layout / "checkpoint-5" / lifecycle.DATA_STATE_FILE).read_text())
                   for layout in ("one", "two")]
    assert [state["loader"] for state in data_states] == [{"epoch": 0, "done": 5}] * 2
    assert {state["settings"]["total batch size"] for state in data_states} == {4}
    assert len({state["settings"]["learning_rate"] for state in data_states}) == 1
