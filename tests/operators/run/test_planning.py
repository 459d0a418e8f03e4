"""The incremental plan without Ray: outputs committed in-process by the real writers (no-op
vectors), then each kind of change to the input or the output and what the next plan does."""

from __future__ import annotations

import json

import pytest

from operators.config.loading import load_config
from operators.config.schema import ConfigError
from operators.model.prepare import prepare
from operators.run.bookkeeping import RunRecord, record_outputs
from operators.run.planning import output_location, plan_run
from tests.helpers import commit_in_process, make_corpus


def cfg_for(tmp_path, input_uri, *extra):
    return load_config(None, [f"input.uri={input_uri}", f"output.uri={tmp_path / 'out'}", "input.rows_per_block=16", *extra])


def commit(cfg, prepared):
    """Plan, commit in process, record the manifest; the next plan's starting point."""
    plan = plan_run(cfg, prepared)
    record_outputs(cfg, plan, commit_in_process(cfg, prepared, plan), RunRecord.begin(cfg))
    return plan


@pytest.fixture
def corpus(tmp_path):
    folder = make_corpus(tmp_path / "in", shards=3, rows=10)
    cfg = cfg_for(tmp_path, folder)
    return folder, cfg, prepare(cfg)


def test_a_fresh_output_embeds_every_shard_and_a_second_plan_nothing(tmp_path, corpus):
    folder, cfg, prepared = corpus
    first = commit(cfg, prepared)
    assert (len(first.todo), first.new, first.changed, first.deleted) == (3, 3, set(), [])
    again = plan_run(cfg, prepared)
    assert again.todo == [] and sorted(again.done) == sorted(s.rel for s in first.shards)
    assert again.config_fingerprint == prepared.fingerprint and again.out_uri == str(tmp_path / "out")


def test_an_edited_shard_is_changed_a_new_one_new_a_removed_one_deleted(tmp_path, corpus):
    folder, cfg, prepared = corpus
    plan_of_before = commit(cfg, prepared).shards
    shards = sorted(folder.glob("*.jsonl"))
    rows = shards[0].read_text().splitlines()
    shards[0].write_text("\n".join([json.dumps({"id": "s0-0", "text": "An edited sentence."}), *rows[1:]]) + "\n")
    shards[1].unlink()
    (folder / "part-9.jsonl").write_text(json.dumps({"id": "n", "text": "A new shard."}) + "\n")
    plan = plan_run(cfg, prepared)
    assert plan.changed == {shards[0].name} and plan.new == 1 and len(plan.todo) == 2
    gone = next(s for s in plan_of_before if s.rel == shards[1].name)
    assert plan.deleted == [gone.output_name] and len(plan.done) == 1


def test_a_subset_of_the_recorded_root_deletes_nothing_unless_pruning(tmp_path, corpus, caplog):
    folder, cfg, prepared = corpus
    commit(cfg, prepared)
    one = sorted(folder.glob("*.jsonl"))[0]
    subset = cfg_for(tmp_path, one)
    plan = plan_run(subset, prepared)
    assert plan.deleted == [] and not plan.prunes and "are kept" in caplog.text
    pruned = plan_run(cfg_for(tmp_path, one, "output.prune=true"), prepared)
    assert pruned.prunes and len(pruned.deleted) == 2


def test_a_cut_vector_file_is_damaged_and_embedded_again(tmp_path, corpus):
    folder, cfg, prepared = corpus
    first = commit(cfg, prepared)
    victim = tmp_path / "out" / first.todo[0].output_name
    victim.write_bytes(victim.read_bytes()[:-100])
    plan = plan_run(cfg, prepared)
    assert plan.damaged == [first.todo[0].rel] and [s.rel for s in plan.todo] == [first.todo[0].rel]


def test_a_lost_manifest_is_rebuilt_from_the_footers(tmp_path, corpus):
    folder, cfg, prepared = corpus
    commit(cfg, prepared)
    (tmp_path / "out" / "manifest.json").unlink()
    plan = plan_run(cfg, prepared)
    assert plan.todo == [] and len(plan.done) == 3
    assert all(e["config_fingerprint"] == prepared.fingerprint and e["rows_in"] == 10 for e in plan.done.values())


def test_another_config_embeds_everything_again(tmp_path, corpus):
    folder, cfg, prepared = corpus
    commit(cfg, prepared)
    other = cfg_for(tmp_path, folder, "extraction.pooling=cls")
    plan = plan_run(other, prepare(other))
    assert len(plan.todo) == 3 and plan.changed == set()  # another config's vectors are never reused


def test_versioned_output_goes_to_its_version_folder_and_the_output_may_not_sit_in_the_input(tmp_path, corpus):
    folder, cfg, prepared = corpus
    versioned = cfg_for(tmp_path, folder, "output.versioned=true")
    assert output_location(versioned, "abc") == (f"{tmp_path / 'out'}/v-abc", "v-abc")
    with pytest.raises(ConfigError, match="lies inside input.uri"):
        plan_run(load_config(None, [f"input.uri={folder}", f"output.uri={folder / 'vectors'}"]), prepared)
