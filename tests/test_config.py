"""The run's configuration: resolved once, then read-only; a misspelt field is an error, not a default."""
import pytest

import train_dml
import train_mcl_okd
from engine import UserError, parse_args
from engine.config import RunConfig, resolve

ARGV = ["--dataset", "synthetic", "--gpu", "-1", "--batch-size", "32"]


def test_misspelt_field_raises_with_a_suggestion():
    cfg = resolve(train_dml.DML, parse_args(train_dml.DML, ARGV))
    assert cfg.kd_T == 1.0 and cfg.batch_size == 32
    with pytest.raises(AttributeError, match="no field 'kd_t'; did you mean kd_T"):
        cfg.kd_t
    with pytest.raises(AttributeError, match="no field 'nce_k'"):   # another method's flag
        cfg.nce_k
    assert getattr(cfg, "nope", "default") == "default"           # getattr with a default still works


def test_config_is_read_only():
    cfg = resolve(train_dml.DML, parse_args(train_dml.DML, ARGV))
    with pytest.raises(AttributeError, match="read-only"):
        cfg.lr = 1.0
    with pytest.raises(AttributeError, match="read-only"):
        del cfg.lr


def test_config_copies_and_pickles():
    """A deep copy of a method (benchmarks, EMA references) copies its frozen config; so does pickling."""
    import copy
    import pickle
    cfg = resolve(train_dml.DML, parse_args(train_dml.DML, ARGV))
    for other in (copy.copy(cfg), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert isinstance(other, RunConfig) and other == cfg
        with pytest.raises(AttributeError, match="read-only"):
            other.lr = 1.0


def test_defaults_are_resolved_before_freezing():
    ns = parse_args(train_mcl_okd.MCLOKD, ARGV + ["--arch", "resnet32"])
    assert ns.nce_k is None and ns.num_classes is None
    cfg = resolve(train_mcl_okd.MCLOKD, ns)
    assert isinstance(cfg, RunConfig)
    assert (cfg.nce_k, cfg.nce_t, cfg.views, cfg.num_classes) == (256, 0.1, 1, 10)
    assert (cfg.loader, cfg.eval_batch_size) == ("device", 64)
    assert ns.nce_k is None and ns.num_classes is None                  # the parsed namespace is left alone
    assert resolve(train_mcl_okd.MCLOKD, cfg) == cfg                      # resolving twice changes nothing


def test_num_classes_must_agree_with_the_dataset():
    with pytest.raises(UserError, match="--num-classes 100 disagrees with synthetic"):
        resolve(train_dml.DML, parse_args(train_dml.DML, ARGV + ["--num-classes", "100"]))


def test_trainer_hands_the_frozen_config_to_the_method(tmp_path):
    from engine import Trainer
    trainer = Trainer(train_dml.DML, parse_args(train_dml.DML, ARGV + ["--subset", "64", "--out", str(tmp_path)]))
    assert isinstance(trainer.args, RunConfig) and trainer.method.args is trainer.args
    with pytest.raises(AttributeError, match="read-only"):
        trainer.method.args.kd_T = 2.0


def test_a_difference_shows_an_option_left_out_as_its_default():
    from engine.config import describe_differences
    assert describe_differences([("eval_subset", None, 128), ("milestones", [150, 225], [100])]) == \
        "--eval-subset default (this command: 128), --milestones 150 225 (this command: 100)"
    assert describe_differences([("world_size", 2, 1)]) == \
        "world size 2 (this command: 1) [run it with torchrun --nproc_per_node=2]"
    assert describe_differences([("world_size", 1, 4)]) == "world size 1 (this command: 4) [without torchrun]"


def test_an_image_size_left_unset_compares_as_the_size_trained():
    """--image-size unset in a run is the size of its data, which the run records: a command giving that size, or
    leaving it unset too, trains the same; another size does not, and neither does leaving unset a size the run
    was given (the command's data may have another default)."""
    from engine.config import differences
    run, trained = {"image_size": None, "world_size": 1}, {"image_size": 32}
    assert differences(run, {"image_size": None, "world_size": 1}, {}, trained=trained) == []
    assert differences(run, {"image_size": 32, "world_size": 1}, {}, trained=trained) == []
    assert differences(run, {"image_size": 64, "world_size": 1}, {}, trained=trained) == [("image_size", 32, 64)]
    given = {"image_size": 64, "world_size": 1}
    assert differences(given, {"image_size": None, "world_size": 1}, {}, trained={"image_size": 64}) == \
        [("image_size", 64, None)]
    assert differences(run, {"image_size": 32, "world_size": 1}, {}) == [("image_size", None, 32)]   # size unknown


def test_a_classes_file_is_compared_by_the_classes_it_lists(tmp_path):
    """A --classes file that lists the classes a run recorded is the run's, wherever it lies now and however an
    older version recorded its name (as typed, relative to a folder not known): a resume of a run whose file was
    moved, or of an older version's record, was refused as trained with another --classes. A file that lists
    other classes, or none that can be read, is another option value."""
    from engine.config import differences
    (tmp_path / "moved.txt").write_text("b\na\n")
    (tmp_path / "other.txt").write_text("a\nc\n")
    recorded, trained = {"classes": "classes.txt", "world_size": 1}, {"classes": ["a", "b"]}
    assert differences(recorded, {"classes": str(tmp_path / "moved.txt"), "world_size": 1}, {}, trained=trained) == []
    for now in (tmp_path / "other.txt", tmp_path / "absent.txt"):
        assert differences(recorded, {"classes": str(now), "world_size": 1}, {}, trained=trained) == [
            ("classes", "classes.txt", str(now))]
    assert differences(recorded, {"classes": str(tmp_path / "moved.txt"), "world_size": 1}, {})[0][0] == "classes"
