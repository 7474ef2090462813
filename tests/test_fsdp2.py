"""FSDP2 on 2 CPU processes (gloo): the optimizers on Shard(0) DTensor parameters, distributed
checkpoints, and KronCallback under Lightning's ModelParallelStrategy.

All checks run in one spawn of two processes (tests/fsdp2_checks.py: one function per check);
each test here asserts that its check passed on both ranks.
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

import fsdp2_checks
from gloo_workers import free_port


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict[str, str]]:
    out_dir = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(fsdp2_checks.run, args=(free_port(), str(out_dir)), nprocs=fsdp2_checks.WORLD)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(fsdp2_checks.WORLD)]


def _assert_passed(outcomes, check) -> None:
    for rank, results in enumerate(outcomes):
        assert results[check.__name__] == "ok", f"rank {rank}:\n{results[check.__name__]}"


def test_soap_shampoo_and_kradagrad_on_uneven_and_empty_shards_match_a_row_chunked_reference(outcomes):
    """Each rank's shard steps like a one-process run blocked at the same rows (fp64, 12 steps,
    refreshes, a NaN on one rank that both ranks skip); full_tensor() is the same on both ranks."""
    _assert_passed(outcomes, fsdp2_checks.check_methods_match_the_row_chunked_reference)


def test_tensor_parallel_replicate_hsdp_and_mixed_parameters_are_refused(outcomes):
    _assert_passed(outcomes, fsdp2_checks.check_unsupported_placements_are_refused)


def test_a_sharded_optimizer_refuses_deepcopy_and_pickle_in_one_line(outcomes):
    _assert_passed(outcomes, fsdp2_checks.check_a_sharded_optimizer_refuses_to_be_copied)


def test_dcp_save_load_and_continuation_are_bit_identical_to_the_uninterrupted_run(outcomes):
    _assert_passed(outcomes, fsdp2_checks.check_dcp_save_load_continue_is_bit_identical)


def test_a_state_saved_at_another_world_size_is_refused(outcomes):
    _assert_passed(outcomes, fsdp2_checks.check_other_world_sizes_are_refused)


def test_a_full_state_dict_of_a_sharded_optimizer_is_refused_on_every_rank(outcomes):
    _assert_passed(outcomes, fsdp2_checks.check_a_full_state_dict_is_refused_on_every_rank)


def test_kron_callback_under_model_parallel_strategy_resumes_equal_to_the_uninterrupted_run(outcomes):
    _assert_passed(outcomes, fsdp2_checks.check_model_parallel_strategy_resumes_exactly)


def test_a_single_file_model_parallel_checkpoint_is_refused_on_resume(outcomes):
    _assert_passed(outcomes, fsdp2_checks.check_model_parallel_strategy_refuses_a_full_checkpoint)
