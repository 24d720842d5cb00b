"""leapllm.cli.args: flags become validated settings, and each mistake is one error naming the flag."""

from __future__ import annotations

import pytest

from leapllm.cli.args import (
    engine_config_from_args,
    model_settings_from_args,
    sampling_from_args,
    serve_settings_from_args,
    server_settings_from_args,
    speculative_from_args,
)
from leapllm.cli.main import build_parser
from leapllm.config import CLI_SAMPLING_DEFAULTS, EngineConfig, ModelSettings, ServerSettings
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError


@pytest.fixture(autouse=True)
def no_api_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("LEAPLLM_API_KEY", raising=False)  # the default of --api-key


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def error_of(make, args) -> str:
    with pytest.raises(InvalidRequestError) as exc:
        make(args)
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- each mistake: one line, naming the flag (or, for the engine and sampling, the setting) -------------

@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["serve", "--tensor-parallel", "0"], "--tensor-parallel must be at least 1, got 0"),
])
def test_model_flag_errors(argv, message):
    assert error_of(model_settings_from_args, parse(*argv)) == message


@pytest.mark.parametrize("argv, message", [
    (["--num-speculative-tokens", "3"], "--num-speculative-tokens needs --speculative ngram or --draft-model"),
    (["--speculative", "ngram", "--draft-model", "d.gguf"], "--speculative ngram takes no --draft-model"),
    (["--speculative", "draft"], "--speculative draft needs --draft-model PATH"),
    (["--speculative", "ngram", "--num-speculative-tokens", "8"],
     "--num-speculative-tokens must be from 1 to 7, got 8"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"],
     "--num-speculative-tokens must be from 1 to 7, got 0"),
    (["--draft-model", "missing-draft.gguf"], "draft model not found: missing-draft.gguf"),
])
def test_speculative_flag_errors(argv, message):
    assert error_of(speculative_from_args, parse("generate", "hi", *argv)) == message


def test_speculative_flags_become_llm_keyword_arguments(tmp_path):
    draft = tmp_path / "draft.gguf"
    draft.write_bytes(b"")
    assert speculative_from_args(parse("generate", "hi")) == {}
    assert speculative_from_args(parse("generate", "hi", "--speculative", "ngram")) == {
        "speculative": "ngram", "draft_model": None, "num_speculative_tokens": 4}
    assert speculative_from_args(parse("generate", "hi", "--draft-model", str(draft), "--num-speculative-tokens",
                                       "2")) == {"speculative": "draft", "draft_model": str(draft),
                                                 "num_speculative_tokens": 2}


@pytest.mark.parametrize("argv, message", [
    (["--max-tokens", "0"], "max_tokens must be a positive integer, got 0"),
    (["--temperature", "-1"], "temperature must be in [0, 100], got -1.0"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--min-p", "1.5"], "min_p must be in [0, 1], got 1.5"),
])
def test_sampling_flag_errors_name_the_setting(argv, message):
    assert error_of(sampling_from_args, parse("generate", "hi", *argv)) == message


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache-gb", "0"], "--kv-cache-gb must be positive, got 0.0"),
    (["--kv-cache-gb", "-1"], "--kv-cache-gb must be positive, got -1.0"),
    (["--max-num-seqs", "0"], "max_num_seqs must be at least 1, got 0"),
    (["--max-num-seqs", "16", "--max-num-batched-tokens", "8"],
     "max_num_batched_tokens (8) must be at least max_num_seqs (16)"),
    (["--block-size", "0"], "block_size must be at least 1, got 0"),
])
def test_engine_flag_errors(argv, message):
    assert error_of(engine_config_from_args, parse("serve", *argv)) == message


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--port", "-5"], "--port must be between 0 and 65535, got -5"),
    (["--max-waiting", "-1"], "--max-waiting must be at least 0, got -1"),
    (["--max-request-bytes", "100"], "--max-request-bytes must be at least 1024, got 100"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be at least 0, got -1.0"),
    (["--served-model-name", " "], "--served-model-name must not be empty"),
    (["--api-key", ""], "--api-key must not be empty"),
    (["--replicas", "0"], "--replicas must be at least 1, got 0"),
    (["--replicas", "3", "--max-replicas", "2"], "--max-replicas (2) must be at least --replicas (3)"),
    (["--max-replicas", "4"], "--max-replicas needs --replicas"),
    (["--ray-address", "auto"], "--ray-address needs --replicas"),
    (["--replicas", "2", "--ray-address", " "], "--ray-address must not be empty (auto starts a local Ray instance)"),
    (["--replicas", "2", "--classifier", "clf"],
     "--classifier is not served by --replicas; run it in a separate leapllm serve"),
    (["--replicas", "2", "--ner-model", "ner"],
     "--ner-model is not served by --replicas; run it in a separate leapllm serve"),
])
def test_server_flag_errors(argv, message):
    assert error_of(server_settings_from_args, parse("serve", *argv)) == message


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2", "--tensor-parallel", "2"],
     "--replicas and --tensor-parallel cannot be combined: each replica is one process"),
    (["--tensor-parallel", "2", "--speculative", "ngram"],
     "speculative decoding is not supported with --replicas or --tensor-parallel"),
])
def test_serve_flag_combinations_that_cannot_work(argv, message):
    assert error_of(serve_settings_from_args, parse("serve", *argv)) == message


# -- defaults and round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_cli_sampling_defaults_come_from_cli_sampling_defaults(command):
    params = sampling_from_args(parse(*command))
    assert {name: getattr(params, name) for name in CLI_SAMPLING_DEFAULTS} == dict(CLI_SAMPLING_DEFAULTS)
    # The API's own defaults stay OpenAI's; only the command line samples the friendlier way.
    assert SamplingParams().temperature == 1.0 and SamplingParams().top_k == 0


def test_flag_defaults_are_the_settings_defaults():
    args = parse("serve")
    assert server_settings_from_args(args) == ServerSettings()
    assert engine_config_from_args(args) == EngineConfig()
    assert model_settings_from_args(args) == ModelSettings()
    assert serve_settings_from_args(args) == (ServerSettings(), ModelSettings(), EngineConfig(), {})


def test_server_and_engine_settings_round_trip_the_flags():
    args = parse("serve", "--model", "m.gguf", "--dtype", "bfloat16", "--device", "cpu", "--threads", "3",
                 "--host", "0.0.0.0", "--port", "9001", "--api-key", "secret", "--served-model-name", "tiny",
                 "--max-waiting", "7", "--shutdown-timeout", "2.5", "--log-level", "warning",
                 "--embedding-model", "default", "--embedding-int8", "--classifier", "clf",
                 "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--kv-cache-gb", "0.25",
                 "--kv-cache-dtype", "int8", "--block-size", "32", "--no-prefix-caching")
    assert server_settings_from_args(args) == ServerSettings(
        host="0.0.0.0", port=9001, api_key="secret", served_model_name="tiny", max_waiting=7, shutdown_timeout=2.5,
        log_level="warning", embedding_model="default", embedding_int8=True, classifier="clf")
    assert engine_config_from_args(args) == EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=128, kv_cache_gb=0.25, kv_cache_dtype="int8", block_size=32,
        enable_prefix_caching=False)
    assert model_settings_from_args(args) == ModelSettings(model="m.gguf", dtype="bfloat16", device="cpu", threads=3)


def test_replica_flags_round_trip():
    args = parse("serve", "--replicas", "2", "--max-replicas", "4", "--ray-address", "head:6379")
    settings = server_settings_from_args(args)
    assert (settings.replicas, settings.max_replicas, settings.ray_address) == (2, 4, "head:6379")
    assert server_settings_from_args(parse("serve", "--replicas", "2")).ray_address is None  # auto: a local Ray


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("LEAPLLM_API_KEY", "from-env")
    assert server_settings_from_args(parse("serve")).api_key == "from-env"
