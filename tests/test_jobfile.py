"""The job-file format: every field, its units, and the errors for what it cannot read."""

from __future__ import annotations

import io

import pytest

from gpuctl.api import convert
from gpuctl.api.jobfile import (
    FIELDS,
    JobFileError,
    load_job_file,
    parse_duration,
    parse_size_mib,
    spec_from_mapping,
    spec_to_mapping,
)
from gpuctl.core.errors import InvalidArgument
from gpuctl.core.model import JobKind, JobSpec, OnNodeLost, SpreadPolicy
from gpuctl.core.validation import spec_violations

BASE = {"kind": "training", "command": ["python", "train.py"]}


def parse(**fields) -> JobSpec:
    return spec_from_mapping({**BASE, **fields})


def violations(data, source: str = "") -> list[tuple[str, str]]:
    with pytest.raises(JobFileError) as caught:
        spec_from_mapping(data, source=source)
    return [(v.field, v.description) for v in caught.value.violations]


# -- every field --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "attr", "expected"),
    [
        ({"kind": "inference", "gpus_per_node": 1}, "kind", JobKind.INFERENCE),
        ({"kind": "Training"}, "kind", JobKind.TRAINING),
        ({"name": "llama-70b"}, "name", "llama-70b"),
        ({"queue": "research"}, "queue", "research"),
        ({"priority": -5}, "priority", -5),
        (
            {"command": ["torchrun", "--nproc-per-node", 8, "train.py"]},
            "command",
            ("torchrun", "--nproc-per-node", "8", "train.py"),
        ),
        (
            {"command": "python train.py --name 'big run'"},
            "command",
            ("python", "train.py", "--name", "big run"),
        ),
        (
            {"env": {"NCCL_DEBUG": "INFO", "SEED": 3, "FAST": True, "LR": 0.5}},
            "env",
            (("FAST", "true"), ("LR", "0.5"), ("NCCL_DEBUG", "INFO"), ("SEED", "3")),
        ),
        ({"working_dir": "/home/alice/run"}, "working_dir", "/home/alice/run"),
        ({"time_limit": 3600}, "time_limit_s", 3600),
        ({"time_limit": "90s"}, "time_limit_s", 90),
        ({"nodes": 4}, "num_nodes", 4),
        ({"gpus_per_node": 8}, "gpus_per_node", 8),
        ({"replicas": 3}, "replicas", 3),
        ({"gpu_share": 0.25}, "gpu_milli", 250),
        ({"gpu_share": 0.3333}, "gpu_milli", 333),
        ({"gpu_milli": 125}, "gpu_milli", 125),
        ({"gpu_memory": "40GiB"}, "gpu_memory_mib", 40 * 1024),
        ({"gpu_memory": 20480}, "gpu_memory_mib", 20480),
        ({"gpu_model": "H100 SXM"}, "gpu_model", "H100 SXM"),
        ({"cpus": 8}, "cpu_milli", 8000),
        ({"cpus": 0.5}, "cpu_milli", 500),
        ({"cpus": "250m"}, "cpu_milli", 250),
        ({"memory": "64GiB"}, "memory_mib", 65536),
        ({"min_nvlink_gbps": 400}, "min_nvlink_gbps", 400.0),
        ({"min_net_gbps": 1600.5}, "min_net_gbps", 1600.5),
        ({"on_node_lost": "fail"}, "on_node_lost", OnNodeLost.FAIL),
        ({"preemptible": True}, "preemptible", True),
        ({"target_tokens_per_s": 40}, "target_tokens_per_s", 40.0),
        ({"weights_gb": 14.5}, "weights_gb", 14.5),
        ({"name": None}, "name", ""),  # `name:` with nothing after it is the default
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_field(fields, attr, expected):
    assert getattr(parse(**fields), attr) == expected


def test_every_field_is_in_the_docs_table():
    import gpuctl.api.jobfile as module

    for name in FIELDS:
        assert f"\n{name} " in module.__doc__, name


def test_defaults_match_the_model():
    assert parse() == JobSpec(kind=JobKind.TRAINING, command=("python", "train.py"))


# -- units --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (0, 0),
        (90, 90),
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        ("1.5h", 5400),
        (" 2H ", 7200),
        ("1:30", 90),  # Slurm's M:SS
        ("1:30:00", 5400),  # H:MM:SS
        ("2-00:00:00", 172800),  # D-HH:MM:SS
        ("1-12", 129600),  # D-H
        ("1-2:30", 95400),  # D-H:MM
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert parse(time_limit=text).time_limit_s == seconds


@pytest.mark.parametrize("text", ["2 hours", "h", "1x", "", "1h-2", True, [1]])
def test_bad_durations(text):
    [(field, description)] = violations({**BASE, "time_limit": text})
    assert field == "time_limit"
    assert "duration like" in description


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        (512, 512),
        ("512", 512),
        ("512MiB", 512),
        ("512Mi", 512),
        ("40GiB", 40960),
        ("40Gi", 40960),
        ("1.5GiB", 1536),
        ("1TiB", 1048576),
        ("2048KiB", 2),
        ("80G", 76294),  # 80e9 bytes, rounded up: fits an "80 GB" H100 (81559 MiB)
        ("80GB", 76294),
        ("1000M", 954),
        ("1T", 953675),
        ("40 gib", 40960),
    ],
)
def test_sizes(text, mib):
    assert parse_size_mib(text) == mib
    assert parse(gpu_memory=text).gpu_memory_mib == mib
    assert parse(memory=text).memory_mib == mib


@pytest.mark.parametrize("text", ["40 gigs", "GiB", "-1GiB", "1e3", 1.5, True])
def test_bad_sizes(text):
    [(field, description)] = violations({**BASE, "memory": text})
    assert field == "memory" and "size like" in description


# -- errors -------------------------------------------------------------------------------


def test_unknown_fields_are_listed_with_a_hint_and_the_known_fields():
    found = violations({**BASE, "gpus": 8, "colour": "red"})

    assert [f for f, _ in found] == ["gpus", "colour"]
    assert "did you mean 'gpus_per_node'?" in found[0][1]
    assert "the fields are: kind, name, queue" in found[1][1]


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"kind": "batch"}, "kind", "must be 'training' or 'inference'"),
        ({"nodes": "2"}, "nodes", "must be an integer, got a string ('2')"),
        ({"nodes": True}, "nodes", "must be an integer, got a boolean"),
        ({"gpus_per_node": 1.5}, "gpus_per_node", "must be an integer"),
        ({"priority": [1]}, "priority", "got a list"),
        ({"name": 42}, "name", "must be a string, got an integer (42)"),
        (
            {"command": {"a": 1}},
            "command",
            "must be a list of strings or one string, got a mapping",
        ),
        (
            {"command": ["python", None]},
            "command",
            "argument 1 must be a string, got nothing (null)",
        ),
        ({"command": "python 'unclosed"}, "command", "cannot be split like a shell command"),
        ({"env": ["A=1"]}, "env", "must be a mapping of NAME: value"),
        ({"env": {"A": None}}, "env", 'A has no value (write A: "" for an empty string)'),
        ({"env": {"A": {"b": 1}}}, "env", "A must be a string"),
        ({"gpu_share": 1.5}, "gpu_share", "must be between 0 and 1"),
        ({"gpu_share": 0}, "gpu_share", "must be between 0 and 1"),
        ({"cpus": "lots"}, "cpus", "must be a number of cores"),
        ({"min_net_gbps": "fast"}, "min_net_gbps", "must be a number"),
        ({"min_net_gbps": float("nan")}, "min_net_gbps", "finite"),
        ({"on_node_lost": "retry"}, "on_node_lost", "must be 'requeue' or 'fail'"),
        ({"preemptible": "yes please"}, "preemptible", "must be true or false"),
        ({"target_tokens_per_s": "fast"}, "target_tokens_per_s", "must be a number"),
        ({"weights_gb": "14GB"}, "weights_gb", "must be a number"),
        ({"gpu_share": 0.5, "gpu_milli": 500}, "gpu_share", "not both"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_wrong_types(fields, field, words):
    found = violations({**BASE, **fields})
    assert [f for f, _ in found] == [field]
    assert words in found[0][1]


def test_every_problem_is_reported_at_once_with_the_source():
    with pytest.raises(JobFileError) as caught:
        spec_from_mapping({"nodes": "x", "memory": "lots", "typo": 1}, source="job.yaml")

    err = caught.value
    assert isinstance(err, InvalidArgument) and isinstance(err, ValueError)
    assert [v.field for v in err.violations] == ["nodes", "memory", "typo", "kind"]
    assert str(err).startswith("job.yaml: nodes: must be an integer")


def test_kind_is_required():
    assert violations({"command": "x"}) == [("kind", "is required: 'training' or 'inference'")]


@pytest.mark.parametrize("document", [[1, 2], "just text", 42])
def test_a_document_that_is_not_a_mapping(tmp_path, document):
    assert violations(document)[0][0] == "(document)"
    path = tmp_path / "job.yaml"
    path.write_text(str(document))
    with pytest.raises(JobFileError, match=r"job\.yaml: \(document\): must be a mapping"):
        load_job_file(path)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("kind: training\ncommand: [python, train.py\nnodes: 2\n")

    with pytest.raises(JobFileError) as caught:
        load_job_file(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: (document): is not valid YAML at line")
    assert caught.value.source == str(path)


def test_load_job_file_reads_a_full_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        """
kind: inference
name: llama-serve
queue: prod
command: vllm serve meta-llama/Llama-3-8B --port 8000
env: {HF_HOME: /models}
replicas: 4
gpu_share: 0.5
gpu_memory: 40GiB
cpus: 4
memory: 32GiB
time_limit: 1d
"""
    )

    spec = load_job_file(path)

    assert spec == JobSpec(
        kind=JobKind.INFERENCE,
        name="llama-serve",
        queue="prod",
        command=("vllm", "serve", "meta-llama/Llama-3-8B", "--port", "8000"),
        env=(("HF_HOME", "/models"),),
        replicas=4,
        gpu_milli=500,
        gpu_memory_mib=40960,
        cpu_milli=4000,
        memory_mib=32768,
        time_limit_s=86400,
    )


def test_load_job_file_from_stdin(monkeypatch):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("kind: training\ngpus_per_node: 8\ncommand: [echo, hi]\n")
    )
    assert load_job_file("-").command == ("echo", "hi")


def test_empty_file_reports_the_missing_kind(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(JobFileError, match=r"empty\.yaml: kind: is required"):
        load_job_file(path)


# -- the inverse --------------------------------------------------------------------------

ROUND_TRIPS = [
    JobSpec(kind=JobKind.TRAINING, command=("torchrun", "train.py")),
    JobSpec(
        kind=JobKind.TRAINING,
        command=("torchrun", "train.py", "--lr", "3e-4"),
        name="pretrain",
        queue="research",
        priority=10,
        env=(("A", "1"), ("NCCL_DEBUG", "INFO")),
        working_dir="/home/alice",
        time_limit_s=5400,
        num_nodes=4,
        gpus_per_node=8,
        min_nvlink_gbps=400.0,
        min_net_gbps=1600.0,
        gpu_model="H100 SXM",
        cpu_milli=96_000,
        memory_mib=1_000_000,
        on_node_lost=OnNodeLost.FAIL,
        preemptible=True,
    ),
    JobSpec(
        kind=JobKind.INFERENCE,
        command=("vllm", "serve"),
        replicas=3,
        gpu_milli=333,
        gpu_memory_mib=76294,
        cpu_milli=1500,
        memory_mib=512,
    ),
    JobSpec(
        kind=JobKind.INFERENCE,
        command=("vllm", "serve", "llama-8b"),
        replicas=2,
        gpus_per_node=1,
        gpu_memory_mib=40960,
        target_tokens_per_s=40.0,
        weights_gb=16.06,
    ),
    JobSpec(
        kind=JobKind.INFERENCE,
        command=("vllm", "serve"),
        replicas=4,
        gpus_per_node=1,
        spread=SpreadPolicy.FABRIC,
    ),
]


@pytest.mark.parametrize(
    "spec",
    ROUND_TRIPS,
    ids=["minimal", "training", "inference", "inference-throughput", "spread-fabric"],
)
def test_spec_to_mapping_round_trips(spec):
    mapping = spec_to_mapping(spec)

    assert spec_from_mapping(mapping) == spec
    assert spec_to_mapping(convert.spec_to_pb(spec)) == mapping  # a proto spec reads the same
    # With every field shown (defaults as themselves or null), it reads back the same too.
    complete = spec_to_mapping(spec, complete=True)
    assert spec_from_mapping(complete) == spec
    assert set(complete) | {"gpu_share", "gpu_milli"} == set(FIELDS)


def test_spec_to_mapping_uses_the_file_vocabulary():
    assert spec_to_mapping(ROUND_TRIPS[1])["time_limit"] == "1h30m"
    assert spec_to_mapping(ROUND_TRIPS[2]) == {
        "kind": "inference",
        "queue": "default",
        "command": ["vllm", "serve"],
        "replicas": 3,
        "gpu_share": 0.333,
        "gpu_memory": "76294MiB",
        "cpus": 1.5,
        "memory": "512MiB",
    }


def test_binary_file_is_reported_not_raised_as_unicode_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xff\xfe\x00kind")
    with pytest.raises(JobFileError, match=r"job\.yaml: \(document\): is not UTF-8 text"):
        load_job_file(path)


# -- the throughput fields, as the server validates them ----------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, [], id="none"),
        pytest.param({"target_tokens_per_s": 40, "weights_gb": 16}, [], id="target-and-weights"),
        pytest.param({"weights_gb": 16}, [], id="weights-alone"),
        pytest.param(
            {"target_tokens_per_s": 40},
            [("spec.target_tokens_per_s", "needs weights_gb")],
            id="target-needs-weights",
        ),
        pytest.param(
            {"target_tokens_per_s": -1, "weights_gb": 16},
            [("spec.target_tokens_per_s", "must be between 0 and 1000000")],
            id="negative-target",
        ),
        pytest.param(
            {"weights_gb": 200_000},
            [("spec.weights_gb", "must be between 0 and 100000")],
            id="weights-bounded",
        ),
        pytest.param(
            # 40 GB = 38147 MiB > 20 GiB = 20480 MiB
            {"weights_gb": 40, "gpu_memory": "20GiB"},
            [("spec.weights_gb", "do not fit the replica's gpu_memory_mib of 20480")],
            id="weights-fit-gpu-memory",
        ),
        pytest.param(
            {"kind": "training", "nodes": 1, "target_tokens_per_s": 40, "weights_gb": 16},
            [
                ("spec.target_tokens_per_s", "is for inference replicas"),
                ("spec.weights_gb", "is for inference replicas"),
            ],
            id="inference-only",
        ),
    ],
)
def test_throughput_fields_are_validated(fields, expected):
    data = {"kind": "inference", "command": ["serve"], "gpus_per_node": 1, **fields}
    if data["kind"] == "training":
        data["gpus_per_node"] = 8
    found = [(v.field, v.description) for v in spec_violations(spec_from_mapping(data))]
    assert len(found) == len(expected), found
    for (field, description), (want_field, words) in zip(found, expected, strict=True):
        assert field == want_field and words in description, (field, description)


def test_an_inference_job_must_say_what_gpus_it_needs_even_none():
    assert violations({"kind": "inference", "command": "serve"}) == [
        (
            "gpus_per_node",
            "an inference replica needs GPUs: give gpus_per_node or gpu_share (or "
            "gpus_per_node: 0 for a replica that needs none)",
        )
    ]
    assert (
        spec_from_mapping({"kind": "inference", "command": "s", "gpus_per_node": 0}).gpus_per_node
        == 0
    )
    assert (
        spec_from_mapping({"kind": "inference", "command": "s", "gpu_share": 0.5}).gpu_milli == 500
    )


def test_every_spec_field_round_trips_through_a_job_file():
    from dataclasses import replace

    from tests.test_store_contract import full_spec

    spec = replace(full_spec(), owner="")  # the owner is the caller, never the file's
    spec = replace(spec, env=tuple(sorted(spec.env)))
    assert spec_from_mapping(spec_to_mapping(spec)) == spec
    assert spec_from_mapping(spec_to_mapping(spec, complete=True)) == spec


@pytest.mark.parametrize(
    "value", [["A100 80GB", "H100 SXM"], "A100 80GB,H100 SXM", "A100 80GB | H100 SXM"]
)
def test_gpu_model_takes_a_list_of_acceptable_models(value):
    spec = spec_from_mapping(
        {"kind": "inference", "command": "serve", "gpus_per_node": 1, "gpu_model": value}
    )
    assert spec.gpu_models == ("A100 80GB", "H100 SXM")
    assert spec_to_mapping(spec)["gpu_model"] == ["A100 80GB", "H100 SXM"]


def test_a_gpu_model_list_with_an_empty_name_is_refused():
    with pytest.raises(JobFileError, match="gpu_model"):
        spec_from_mapping(
            {"kind": "inference", "command": "serve", "gpus_per_node": 1, "gpu_model": "A,,B"}
        )


def test_a_checked_file_names_its_keys_and_numbers_in_its_own_units(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "kind: training\nnodes: 2000\ngpus_per_node: 8\ncpus: -2\nmemory: 20TiB\n"
        "time_limit: 400d\ncommand: [python]\nenv: {1BAD: x}\n"
    )
    with pytest.raises(JobFileError) as e:
        load_job_file(path)
    assert {str(v) for v in e.value.violations} == {
        "nodes: must be between 1 and 1024, got 2000",
        "cpus: must be between 0 and 1024, got -2",
        "memory: must be between 0 and 16TiB, got 20TiB",
        "time_limit: must be between 0 and 365d, got 400d",
        "env.1BAD: is not a valid variable name",
    }
    assert str(e.value).startswith(f"{path}: ")
    # Unchecked, a mapping is only parsed (a part of a spec, for tools that fill the rest).
    assert spec_from_mapping({"kind": "training", "cpus": -2}).cpu_milli == -2000
