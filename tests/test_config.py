"""Config: presets load, overrides are typed, and every user mistake is one sentence."""

import dataclasses
import json
import re
import warnings

import pytest

import vae
from dalle_mini_impl.config import (
    VAE_KIND_KEYS,
    RunConfig,
    VAEConfig,
    available_presets,
    config_from_dict,
    config_to_dict,
    load_config,
    read_config_json,
    save_config,
)
from dalle_mini_impl.errors import UserError, run_cli
from train.loop import check_training_values
from train.vae import build_tokenizer, check_phases


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads_and_passes_the_checks_its_stages_make_before_training(preset):
    """Each [train.*] section's values, and the image tokenizer's two phases together (train.vae_decoder shares
    train.vae's accelerator, so their mixed precision must agree): a preset that fails them stops a stage."""
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.image_size % cfg.vae.factor == 0
    for name, tc in vars(cfg.train).items():
        check_training_values(tc, f"train.{name}.")
    check_phases(cfg)


@pytest.mark.parametrize("preset", available_presets())
def test_every_presets_tokenizer_builds_and_its_critic_trains_a_step(preset):
    """The GPU presets never train here: their tokenizer at least builds, codes an image of the preset's size to
    its grid, and a VQ's critic (configs/dalle256.toml turns it on) gives one finite, balanced step of each side."""
    import torch

    from train.vae import build_tokenizer

    cfg = load_config(preset)
    torch.manual_seed(0)
    model = build_tokenizer(cfg)
    size = cfg.data.image_size
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model.encode(images).shape == (1, size // cfg.vae.factor, size // cfg.vae.factor)
    if cfg.vae.kind != "vq" or cfg.vae.disc_start < 0:
        return
    loss, metrics = model(images, cfg.vae.disc_start)  # the critic's first step
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["adversarial_weight"]) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.generator_parameters() if p.grad is not None)
    d_loss, _ = model(images, cfg.vae.disc_start, reconstruction=metrics["reconstruction"])
    model.discriminator.zero_grad()  # the generator's GAN term reached the critic too
    d_loss.backward()
    assert torch.isfinite(d_loss) and any(p.grad.abs().sum() > 0 for p in model.discriminator.parameters())


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "shapes",
        [
            "vae.codebook_size=1024",
            "data.image_size=64",
            "train.dalle.lr=3e-4",
            "vae.straight_through=true",
            "transformer.attn_patterns=row,column",
            'data.shapes.held_out=["red circle"]',
            "vae.group_sizes=8,64",  # a list written a,b,c reads each item as --set reads a value
            "train.dalle.betas=0.9, 0.95",
        ],
        data="some/folder",
        split="validation",
    )
    assert cfg.vae.codebook_size == 1024 and cfg.data.image_size == 64
    assert cfg.train.dalle.lr == pytest.approx(3e-4)
    assert cfg.vae.straight_through is True
    assert cfg.transformer.attn_patterns == ["row", "column"]
    assert cfg.data.shapes.held_out == ["red circle"]
    assert cfg.vae.group_sizes == [8, 64] and cfg.train.dalle.betas == [0.9, 0.95]
    assert (cfg.data.source, cfg.data.split) == ("some/folder", "validation")


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config("shapes", ["train.vae.lr=1"]).train.vae.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("vae.codebok_size=1024", "unknown config key 'vae.codebok_size'; allowed keys here are: "),
        ("vae.codebook_size=big", "config key 'vae.codebook_size' must be an integer, got 'big'"),
        ("vae.ema=maybe", "config key 'vae.ema' must be true or false, got 'maybe'"),
        ("vae.group_sizes=8,big", "config key 'vae.group_sizes' must be a list of integers, got '8,big'"),
        ("data=3", "config key 'data' is a section; set its keys"),
        ("novalue", "override 'novalue' must look like key=value"),
    ],
)
def test_mistakes_are_one_sentence(override, message):
    with pytest.raises(UserError) as e:
        load_config("shapes", [override])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_missing_config_file_names_the_file_and_the_presets():
    with pytest.raises(UserError, match=r"config file 'nope.toml' does not exist; give a path or one of: .*shapes"):
        load_config("nope.toml")


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[vae\ncodebook_size = 3\n")
    with pytest.raises(UserError, match="is not valid TOML"):
        load_config(bad)


def test_unknown_key_in_a_preset_file(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[transformer]\ndepht = 3\n")
    with pytest.raises(UserError, match="unknown config key 'transformer.depht'"):
        load_config(p)


def test_a_preset_over_its_base_changes_only_what_it_states(tmp_path):
    (tmp_path / "parent.toml").write_text(
        'name = "parent"\n[transformer]\ndepth = 3\nheads = 2\n[clip]\nswap_phrases = ["a", "b"]\n'
    )
    (tmp_path / "child.toml").write_text('base = "parent.toml"\nname = "child"\n[transformer]\ndepth = 5\n')
    (tmp_path / "grandchild.toml").write_text('base = "child.toml"\n[clip]\nswap_phrases = ["c"]\n')
    cfg = load_config(tmp_path / "grandchild.toml")
    assert (cfg.name, cfg.transformer.depth, cfg.transformer.heads) == ("child", 5, 2)
    assert cfg.clip.swap_phrases == ["c"]  # a list replaces the base's, it is not appended to
    assert load_config(tmp_path / "parent.toml").transformer.depth == 3
    # a base that is not beside the preset is a preset's name
    (tmp_path / "named.toml").write_text('base = "shapes"\n[train.dalle]\nsteps = 7\n')
    named, shapes = load_config(tmp_path / "named.toml"), load_config("shapes")
    assert named.train.dalle.steps == 7
    named.train.dalle.steps = shapes.train.dalle.steps
    assert config_to_dict(named) == config_to_dict(shapes)


def test_the_gpu_emoji_preset_follows_the_cpu_one_but_for_its_sizes_and_steps():
    """configs/emoji_gpu.toml states only what a GPU changes: the data, tokenizers, reranker design, sampling and
    the judge are the CPU preset's (so both presets' models are graded alike), the sizes and steps its own."""
    cpu, gpu = config_to_dict(load_config("emoji")), config_to_dict(load_config("emoji_gpu"))
    for section in ("data", "text", "vae", "judge", "sample"):
        assert gpu[section] == cpu[section], section
    assert gpu["clip"]["text_depth"] == cpu["clip"]["text_depth"] == 0
    assert gpu["clip"]["swap_phrases"] == cpu["clip"]["swap_phrases"]
    assert gpu["clip"]["image_width"] > cpu["clip"]["image_width"]
    assert gpu["transformer"]["preset"] != cpu["transformer"]["preset"]
    assert gpu["train"]["dalle"]["steps"] > cpu["train"]["dalle"]["steps"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('base = "nowhere.toml"\n', "has base = 'nowhere.toml', which is neither a file beside it nor one of: "),
        ("base = 3\n", "has base = 3; give a preset's file name"),
        ('base = "loop.toml"\n', "is its own base ("),
    ],
)
def test_a_bad_base_is_one_sentence(tmp_path, text, message):
    (tmp_path / "loop.toml").write_text(text)
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "loop.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_base_cycle_through_two_presets_names_the_chain(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(UserError, match=r"config file '.*a.toml' is its own base \(.*a.toml -> .*b.toml -> .*a.toml\)"):
        load_config(tmp_path / "a.toml")


def test_resolved_config_round_trips_through_json(tmp_path):
    cfg = load_config("shapes", ["vae.codebook_size=256"])
    save_config(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["vae"]["codebook_size"] == 256
    back = read_config_json(tmp_path / "config.json")
    assert config_to_dict(back) == config_to_dict(cfg)
    assert config_from_dict({"seed": 3}).seed == 3


def test_an_older_configs_renamed_key_loads_with_one_warning(tmp_path):
    values = config_to_dict(RunConfig())
    del values["sample"]["guidance_scale"]
    values["sample"]["cfg"] = 2.5  # the name bundles were saved with before `guidance_scale`
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.warns(FutureWarning, match="config key 'sample.cfg' is now 'sample.guidance_scale'") as seen:
        cfg = read_config_json(tmp_path / "config.json")
    assert cfg.sample.guidance_scale == 2.5 and len(seen) == 1
    with pytest.warns(FutureWarning, match="sample.cfg"):  # the same for a --set
        assert load_config("shapes", ["sample.cfg=4"]).sample.guidance_scale == 4.0


def test_a_commands_warning_is_one_line(capsys):
    """Every command (run_cli) says a warning in one line; Python's own format added the file, line and a second
    line of code from config.py, which a user of `train.dalle --set sample.cfg=4` has no use for."""
    with pytest.raises(SystemExit) as done:
        run_cli(lambda argv: load_config("shapes", ["sample.cfg=4"]) and 0, [])
    assert done.value.code == 0
    said = "warning: config key 'sample.cfg' is now 'sample.guidance_scale'; read it as that\n"
    assert capsys.readouterr().err == said


def test_a_run_folder_that_cannot_be_one_is_one_sentence(tmp_path):
    import argparse

    from dalle_mini_impl.config import add_config_args, config_from_args

    (tmp_path / "afile").write_text("x")
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    for out, says in [
        (str(tmp_path / "afile"), "is a file; pass --out a folder"),
        (str(tmp_path / "afile" / "sub"), "which is a file; pass --out another folder"),
        ("", "--out is empty; name the run folder"),
    ]:
        with pytest.raises(UserError, match=says):
            config_from_args(parser.parse_args(["--config", "shapes", "--out", out]))
    assert config_from_args(parser.parse_args(["--out", str(tmp_path / "new" / "run")])).out_dir.endswith("run")


def test_train_all_only_names_stages_of_the_config():
    from train.all import check_only

    names = ["tokenizer", "vae", "encode", "dalle", "clip"]
    assert check_only(None, names) is None
    assert check_only("vae, encode", names) == {"vae", "encode"}  # spaces around the names are fine
    with pytest.raises(UserError, match="--only names no stage \\(vea\\) of this config; choose from tokenizer"):
        check_only("vea,dalle", names)
    with pytest.raises(UserError, match="--only is empty"):
        check_only(",", names)


def test_train_all_names_a_missing_data_path_before_any_other_complaint(tmp_path):
    from train import all as train_all

    # once: "clip.hard_negatives on data other than shapes needs clip.swap_phrases", about a path that is not there
    with pytest.raises(UserError, match="data path '.*nothing' does not exist; check the path"):
        train_all.main(["--config", "shapes", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_train_all_names_a_bad_flip_pattern_before_training_anything(tmp_path):
    from train import all as train_all

    with pytest.raises(UserError, match="config key 'data.encode_flip_exclude' is not a valid regular expression"):
        train_all.main(
            ["--config", "shapes", "--out", str(tmp_path / "r"), "--set", "data.encode_flip=true"]
            + ["--set", "data.encode_flip_exclude=(left"]
        )
    assert not (tmp_path / "r").exists()


def test_train_all_refuses_a_decoder_phase_of_a_dvae_before_training_anything(tmp_path):
    from train import all as train_all

    with pytest.raises(UserError, match="fine-tunes a VQ's decoder on its fixed codes, and vae.kind is 'dvae'"):
        train_all.main(["--config", "shapes", "--out", str(tmp_path / "r"), "--set", "train.vae_decoder.steps=10"])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "setting, says",
    [
        ("vae.factor=0", "config section 'vae': factor must be a power of two"),  # once a ZeroDivisionError
        ("train.clip.eval_batches=0", "train.clip.eval_batches is 0; evaluate on 1 batch or more"),
        ("train.dalle.steps=-1", "train.dalle.steps is -1"),
        # once shards written until the disk was full, after the tokenizer had trained
        ("data.max_examples=0", "the shapes training stream is endless and data.max_examples is 0"),
        ("clip.pool=avg", "config key 'clip.pool' is 'avg'; set it to eot or mean"),  # once after the tokenizer
        ("clip.patch_size=0", "config key 'clip.patch_size' is 0; set it to a positive size"),  # once a traceback
        ("clip.embed_dim=0", "config key 'clip.embed_dim' is 0"),  # once trained, every gradient 0
        ("clip.image_depth=-1", "config key 'clip.image_depth' is -1; set it to 0 or more blocks"),
        ("clip.crop_scale_min=0", "config key 'clip.crop_scale_min' is 0.0; set it in (0, 1]"),
    ],
)
def test_train_all_names_a_later_stages_bad_setting_before_training_anything(tmp_path, setting, says):
    """The last stage's mistake once surfaced after the stages before it had trained (hours, in a real preset)."""
    from train import all as train_all

    with pytest.raises(UserError, match=f"^{re.escape(says)}"):
        train_all.main(["--config", "shapes", "--out", str(tmp_path / "r"), "--set", setting])
    assert not (tmp_path / "r").exists()


def test_a_config_folder_is_named_as_one(tmp_path):
    from dalle_mini_impl.config import load_config

    with pytest.raises(UserError, match="config '.*' is a folder; give a preset file \\(a .toml\\) in it"):
        load_config(str(tmp_path))
    # once "not valid TOML" for a bundle's config.json, "such as BUNDLE/shapes.toml" for its folder (which does
    # not exist), and "'' is a folder" for an empty --config
    (tmp_path / "config.json").write_text("{}")
    for given in (tmp_path / "config.json", tmp_path):
        with pytest.raises(
            UserError, match="is a (trained model's config.json|run folder or bundle); --config takes a"
        ):
            load_config(str(given))
    with pytest.raises(UserError, match="--config is empty; give a preset's path or one of: configs/"):
        load_config("")


def test_a_tokenizer_asked_to_read_no_caption_names_the_key(tmp_path):
    from train import tokenizer as train_tokenizer

    # once blamed on data.source and data.caption_column
    with pytest.raises(UserError, match="'text.max_train_captions' is 0; read at least 1 caption"):
        train_tokenizer.main(["--config", "shapes", "--out", str(tmp_path / "r"), "--set", "text.max_train_captions=0"])


def test_config_paths_and_files_that_cannot_be_read_are_one_sentence_naming_the_file(tmp_path, monkeypatch):
    """Once: `--set out_dir=` made the current folder the run folder; a bundle's config.json with an unknown key
    was refused without naming the file (python -m sample has no --set to blame); `configs/emoji.toml`, as the
    docs write it, was "does not exist" outside the project's root; an unreadable preset was an OSError traceback."""
    from argparse import Namespace

    from dalle_mini_impl.config import config_from_args

    given = Namespace(config="shapes", overrides=["out_dir="], data=None, split=None, out=None)
    with pytest.raises(UserError, match="the run folder \\(out_dir\\) is empty; name it with --out"):
        config_from_args(given)
    values = config_to_dict(RunConfig())
    values["sample"]["new_knob"] = 1
    (tmp_path / "config.json").write_text(json.dumps(values))
    named = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(UserError, match=f"config file '{named}': unknown config key"):
        read_config_json(tmp_path / "config.json")
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/emoji.toml").data.image_size == 64
    with pytest.raises(UserError, match="config file '/proc/self/mem' cannot be read"):
        load_config("/proc/self/mem")


def test_a_set_value_of_a_string_key_is_kept_as_typed_and_booleans_take_1_and_0():
    """Once `--set data.exclude=2.50` became '2.5', `1e3` '1000.0', a date or `true` was refused as not a string,
    a quoted list item `", noto style"` was split and trimmed to 'noto style', and `compile=1` was refused."""
    cases = {
        "data.exclude=2.50": ("data", "exclude", "2.50"),
        "data.include=1e3": ("data", "include", "1e3"),
        "name=2024-06-01": (None, "name", "2024-06-01"),
        "data.exclude=true": ("data", "exclude", "true"),
        'data.exclude="a, b"': ("data", "exclude", "a, b"),
        'clip.swap_phrases=", noto style"': ("clip", "swap_phrases", [", noto style"]),
        "clip.swap_phrases=a, b": ("clip", "swap_phrases", ["a", "b"]),  # the comma shorthand, unquoted
        'clip.swap_phrases=["x, y", "z"]': ("clip", "swap_phrases", ["x, y", "z"]),
        "train.dalle.compile=1": ("train.dalle", "compile", True),
        "train.dalle.compile=0": ("train.dalle", "compile", False),
        "vae.group_sizes=8,64": ("vae", "group_sizes", [8, 64]),  # numbers still read as numbers
        "train.dalle.lr=1e-3": ("train.dalle", "lr", 0.001),
    }
    for override, (section, key, expected) in cases.items():
        node = load_config("shapes", [override])
        for part in section.split(".") if section else ():
            node = getattr(node, part)
        assert getattr(node, key) == expected and type(getattr(node, key)) is type(expected), override
    with pytest.raises(UserError, match="'train.dalle.compile' must be true or false, got 2"):
        load_config("shapes", ["train.dalle.compile=2"])


def test_a_preset_string_where_a_list_belongs_is_refused_with_the_list_to_write(tmp_path):
    """A preset's `swap_phrases = ", noto style"` was split at its comma and trimmed to ['noto style'], silently;
    the comma shorthand is `--set`'s alone."""
    preset = tmp_path / "p.toml"
    preset.write_text('[clip]\nswap_phrases = ", noto style"\n')
    expected = "'clip.swap_phrases' must be a list of strings, got the string ', noto style'; write it as a TOML list"
    with pytest.raises(UserError, match=re.escape(expected + ', e.g. swap_phrases = [", noto style"]')):
        load_config(preset)
    preset.write_text('[vae]\ngroup_sizes = "8, 64"\n')
    with pytest.raises(UserError, match=r"e.g. group_sizes = \[8, 64\]"):
        load_config(preset)
    preset.write_text('[clip]\nswap_phrases = [", noto style"]\n')
    assert load_config(preset).clip.swap_phrases == [", noto style"]


def test_a_seed_no_generator_takes_is_one_sentence_when_the_config_loads():
    """`--set seed=-1` (often meant as "random") passed train.all's checks and stopped its second stage with a
    ValueError traceback from the seeding."""
    for key in ("seed", "judge.seed"):
        for bad in (-1, 2**32):
            with pytest.raises(UserError, match=f"^config key '{key}' is {bad}; use an integer from 0 to 4294967295$"):
                load_config("shapes", [f"{key}={bad}"])
    assert load_config("shapes", ["seed=4294967295"]).seed == 2**32 - 1


def test_an_image_tokenizer_schedule_no_run_can_use_is_one_sentence_before_training():
    """A temperature of 0 stopped train.vae's first step with a ValueError (under train.all after the tokenizer
    stage), a usage window of 0 too; a negative KL or commitment weight trained away from the data in silence."""
    for setting, says in [
        ("vae.temperature_start=0", "'vae.temperature_start' is 0.0; set it at least 0.001, e.g. 1.0"),
        ("vae.temperature_end=-1", "'vae.temperature_end' is -1.0; set it at least 0.001"),
        ("vae.temperature_end=1e-38", "'vae.temperature_end' is 1e-38; set it at least 0.001"),  # a traceback once
        ("vae.usage_window=0", "'vae.usage_window' is 0; set it at least 1, e.g. 100"),
        ("vae.kl_weight=-1", "'vae.kl_weight' is -1.0; set it at least 0"),
        ("vae.diversity_weight=-0.5", "'vae.diversity_weight' is -0.5; set it at least 0, e.g. 0.01"),
        ("vae.commitment_weight=nan", "'vae.commitment_weight' is nan; set it at least 0"),  # on the emoji VQ
        ("vae.temperature_steps=-5", "'vae.temperature_steps' is -5; set it at least 0"),
    ]:
        preset = "emoji" if setting.startswith("vae.commitment") else "shapes"
        with pytest.raises(UserError, match=f"^config key {re.escape(says)}"):
            check_phases(load_config(preset, [setting]))
    # the edges are uses
    check_phases(load_config("shapes", ["vae.temperature_steps=0", "vae.kl_weight=0", "vae.temperature_end=0.001"]))
    with pytest.raises(UserError, match="^vae.disc_start is 0 and train.vae.mixed_precision 'fp16': the critic"):
        check_phases(load_config("emoji", ["vae.disc_start=0", "train.vae.mixed_precision=fp16"]))
    check_phases(
        load_config(
            "emoji", ["vae.disc_start=0", "train.vae.mixed_precision=bf16", "train.vae_decoder.mixed_precision=bf16"]
        )
    )
    check_phases(load_config("emoji", ["train.vae.mixed_precision=fp16", "train.vae_decoder.mixed_precision=fp16"]))
    # the dVAE's diversity weight was its constructor's alone (0.01), out of every config's reach
    assert build_tokenizer(load_config("shapes", ["vae.diversity_weight=0"])).diversity_weight == 0
    assert build_tokenizer(load_config("shapes", [])).diversity_weight == 0.01


def test_a_setting_of_the_other_tokenizer_kind_is_one_sentence_when_the_config_loads(tmp_path):
    """A VQ's critic set on a dVAE run (`vae.disc_start=0`: "switches on the patch discriminator") trained no critic,
    and a dVAE's temperature or KL schedule on a VQ run changed nothing: each key is read by one kind only."""
    for preset, setting, says in [
        (
            "shapes",
            "vae.disc_start=0",
            "'vae.disc_start' (set by --set) is read by the vq image tokenizer alone, and "
            "this run's vae.kind is 'dvae'; remove it, or set vae.kind=vq",
        ),
        ("shapes", "vae.lookup_dim=4", "'vae.lookup_dim' (set by --set) is read by the vq image tokenizer alone"),
        (
            "emoji",
            "vae.kl_weight=1.0",
            "'vae.kl_weight' (set by --set) is read by the dvae image tokenizer alone, "
            "and this run's vae.kind is 'vq'; remove it, or set vae.kind=dvae",
        ),
        ("emoji", "vae.straight_through=true", "'vae.straight_through' (set by --set) is read by the dvae"),
    ]:
        with pytest.raises(UserError, match=f"^config key {re.escape(says)}"):
            load_config(preset, [setting])
    preset = tmp_path / "mine.toml"
    preset.write_text('base = "emoji.toml"\n[vae]\ntemperature_steps = 100\n')
    with pytest.raises(
        UserError, match=f"^config key 'vae.temperature_steps' \\(in {re.escape(str(preset))}\\) is read"
    ):
        load_config(preset)
    # the keys both kinds read; a kind set after the other kind's keys (its own settings of the preset are left
    # to the preset); another kind's key that --set turns to the run's kind
    assert load_config("emoji", ["vae.code_dim=64", "vae.disc_start=0"]).vae.disc_start == 0
    assert load_config("shapes", ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]"]).vae.kind == "vq"
    assert load_config("shapes", ["vae.disc_start=0", "vae.kind=vq"]).vae.kind == "vq"
    # the table holds every `vae` key that one kind alone reads, as its constructor or (the dVAE) its schedules
    readers = {
        f.name: {k for k in vae.KINDS if f.name in vae.constructor_fields(k)}
        | ({"dvae"} if f.name in vae.SCHEDULE_FIELDS else set())
        for f in dataclasses.fields(VAEConfig)
    }
    one_kind = {name: kinds.pop() for name, kinds in readers.items() if len(kinds) == 1}
    assert {name: kind for kind, names in VAE_KIND_KEYS.items() for name in names} == one_kind


def test_a_kind_switched_by_set_warns_of_the_presets_keys_it_leaves_unread():
    """--set vae.kind=vq on the shapes preset kept its dVAE schedule (temperature_steps, kl_warmup_steps) and
    said nothing, where --set of the same keys was refused: now it is a warning naming them."""
    with pytest.warns(UserWarning, match=r"^the preset's vae.temperature_steps, vae.kl_warmup_steps are not read by "):
        load_config("shapes", ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("shapes", [])  # its own kind
        load_config("shapes", ["vae.kind=vq", "vae.group_sizes=[]", "vae.group_inputs=[]", "vae.temperature_steps=5000",
                               "vae.kl_warmup_steps=2000"])  # fmt: skip


def test_unclip_decoder_keys_of_the_transformer_section_are_one_sentence_when_the_config_loads(tmp_path):
    """`transformer.cond_dropout=0.9` trained train.dalle and train.unclip to the same bytes as without it: train.unclip
    sets the decoder's cond_* from the `unclip` section, and the DALL-E transformer reads no embedding."""
    with pytest.raises(UserError) as e:
        load_config("shapes", ["transformer.cond_dropout=0.9"])
    assert str(e.value) == (
        "config key 'transformer.cond_dropout' (set by --set) is 0.9, but train.unclip sets it for unCLIP's decoder "
        "from unclip.embedding_dropout and the DALL-E transformer reads no embedding; remove it and set "
        "unclip.embedding_dropout"
    )
    with pytest.raises(UserError, match=r"^config key 'transformer.cond_dim' \(set by --set\) is 8, .* the CLIP's "):
        load_config("emoji", ["transformer.cond_dim=8", "transformer.cond_len=2"])
    preset = tmp_path / "mine.toml"
    preset.write_text('base = "shapes"\n[transformer]\ncond_len = 2\n')
    with pytest.raises(UserError, match=rf"^config key 'transformer.cond_len' \(in {re.escape(str(preset))}\) is 2"):
        load_config(preset)
    assert load_config("shapes", ["transformer.cond_dropout=0.1"]).transformer.cond_dropout == 0.1  # the default


def test_run_cli_exits_with_the_commands_own_code():
    """A stage stopped by SIGTERM raises SystemExit(143) inside main; run_cli passes it on (as argparse's 2)."""

    def stopped(argv):
        raise SystemExit(143)

    for main, code in [(stopped, 143), (lambda argv: 0, 0), (lambda argv: 3, 3)]:
        with pytest.raises(SystemExit) as done:
            run_cli(main, [])
        assert done.value.code == code
