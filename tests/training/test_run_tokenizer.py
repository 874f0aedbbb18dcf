"""A run remembers its tokenizer: `mambakit prepare` keeps the tokenizer's files beside the
token file, `mambakit train` on that file stores them in its checkpoint (and run directory),
and `mambakit generate --model RUN` decodes with them instead of falling back to bytes."""

import numpy as np
import pytest
import torch

from mambakit.cli import main
from mambakit.models.lm import MambaLM
from mambakit.training import TrainConfig, train
from mambakit.training.data import load_corpus

TEXTS = ["the state space model remembers", "a selective scan over the sequence", "mamba models the state",
         "the scan remembers a token"]
MODEL = dict(d_model=16, n_layer=1, d_state=4, vocab_size=60)


def _hf_tokenizer(directory):
    """A small BPE (60 tokens) trained on TEXTS, saved as transformers saves one."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    hf.save_pretrained(str(directory))
    return hf


def _cfg(tmp_path, data, **kw):
    base = dict(data=str(data), out_dir=str(tmp_path / "run"), seq_len=16, batch_size=2, max_steps=2, eval_every=2,
                eval_batches=1, save_every=1, warmup_steps=1)
    return TrainConfig(**{**base, **kw})


def _prepare(tmp_path):
    hf = _hf_tokenizer(tmp_path / "tok")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(" ".join(TEXTS[(i + j) % 4] for j in range(40)))
    tokens = tmp_path / "tokens.npy"
    assert main(["prepare", "--tokenizer", str(tmp_path / "tok"), "--data", str(corpus), "--out", str(tokens)]) == 0
    return hf, corpus, tokens


def test_a_run_on_prepared_tokens_stores_its_tokenizer_and_generate_decodes_with_it(tmp_path, capsys):
    hf, corpus, tokens = _prepare(tmp_path)
    source = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    train(_cfg(tmp_path, tokens), MODEL, progress=False)
    run = tmp_path / "run"
    checkpoint = run / (run / "latest").read_text().strip()
    assert checkpoint.name == "ckpt-0000002"
    for directory in (checkpoint, run):  # the checkpoint holds the tokenizer; so does the run directory
        assert (directory / "tokenizer.json").read_bytes() == source
        assert (directory / "tokenizer_config.json").is_file()
    from mambakit.training.data import tokenizer_sidecar
    assert (tokenizer_sidecar(tokens) / "tokenizer.json").read_bytes() == source  # beside the token file

    from mambakit.tokenizer import HFTokenizer, load_for_model
    text = "the mamba model remembers the scan"
    ids = hf.encode(text, add_special_tokens=False)
    for where in (run, checkpoint):
        tokenizer = load_for_model(where)
        assert isinstance(tokenizer, HFTokenizer)
        assert tokenizer.encode(text) == ids and tokenizer.decode(ids) == hf.decode(ids) == text

    # `mambakit generate --model RUN` decodes the model's tokens with the run's tokenizer
    capsys.readouterr()
    prompt = "the state"
    assert main(["generate", "--model", str(run), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    model = MambaLM.from_pretrained(run).eval()
    prompt_ids = hf.encode(prompt, add_special_tokens=False)
    new = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6)[0, len(prompt_ids):].tolist()
    assert capsys.readouterr().out.rstrip("\n") == prompt + hf.decode(new, skip_special_tokens=True)


def test_the_tokenizer_follows_the_run(tmp_path, capsys):
    """A resume keeps the checkpoint's tokenizer even when the sidecar is gone; a byte-level
    run over the same directory leaves no stale tokenizer behind; a sidecar that does not
    record the token file is not used."""
    from mambakit.tokenizer import ByteTokenizer, HFTokenizer, load_for_model
    from mambakit.training.data import tokenizer_sidecar
    _, corpus, tokens = _prepare(tmp_path)
    train(_cfg(tmp_path, tokens), MODEL, progress=False)
    sidecar = tokenizer_sidecar(tokens)
    for f in sidecar.iterdir():
        f.unlink()
    sidecar.rmdir()
    train(_cfg(tmp_path, tokens, max_steps=3, resume=True), MODEL, progress=False)
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "ckpt-0000003"
    assert isinstance(load_for_model(run / "ckpt-0000003"), HFTokenizer)

    train(_cfg(tmp_path, corpus, overwrite=True), dict(d_model=16, n_layer=1, d_state=4), progress=False)
    assert isinstance(load_for_model(run), ByteTokenizer)
    assert not list(run.glob("tokenizer*")) and not list(run.glob("ckpt-*/tokenizer*"))

    _prepare(tmp_path / "again")
    other = tmp_path / "again" / "tokens.npy"
    np.save(other, np.arange(50, dtype=np.uint16) % 30)  # not the file the sidecar records
    capsys.readouterr()
    assert load_corpus(other).tokenizer_dir is None
    assert "does not record" in capsys.readouterr().err
