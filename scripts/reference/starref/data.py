"""Training data for the reference models: a reproducible English corpus and the induction toy task.

Corpus: the text of pinned Debian documentation packages (the Python 3.11 documentation sources, the Debian
Administrator's Handbook in English, the Debian Reference, the Perl documentation), fetched with
`apt-get download PACKAGE=VERSION`, checked against the sha256 in PACKAGES, unpacked with `dpkg-deb -x` and reduced
to plain text (HTML tags and entities removed, POD/reST markup kept as text). Documents are split into train and
validation by a hash of their path, so the split does not depend on the order of files. A byte-level BPE tokenizer
(HF `tokenizers`) is trained on the train split only. Output: tokenizer.json, train.bin / val.bin (uint16 token
ids, documents joined by the end-of-text token) and manifest.json (packages, hashes, sizes).

Induction: sequences [BOS, x_1 .. x_L, x_1 .. x_L] of random tokens; a model that continues the second copy
correctly has learnt to find the previous occurrence of the current token and copy its successor. Accuracy counts
the predictions of x_2 .. x_L in the second copy (x_1 of the copy is not predictable).
"""
import hashlib
import html
import json
import os
import re
import subprocess
import tempfile

import numpy as np
try:  # the corpus builder needs only numpy and tokenizers; the batches need torch
    import torch
except ImportError:
    torch = None

# (package, version, sha256 of the .deb, the text it contributes: a glob under the unpacked tree)
PACKAGES = [
    ("python3.11-doc", "3.11.2-6+deb12u9",
     "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"),
    ("debian-handbook", "11.20220922",
     "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa", "usr/share/doc/debian-handbook/html/en-US/*.html"),
    ("debian-reference-en", "2.100",
     "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f", "usr/share/debian-reference/*.en.html"),
    ("perl-doc", "5.36.0-7+deb12u4",
     "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8", "usr/share/perl/**/*.pod"),
]
EOT = "<|endoftext|>"
VAL_FRACTION = 0.02


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def html_to_text(s):
    s = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", s)
    s = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</h\d>|</li>|</tr>|</pre>", "\n", s)
    s = re.sub(r"<[^>]+>", "", s)
    return html.unescape(s)


def clean(s):
    s = s.replace("\r", "")
    s = re.sub(r"[ \t]+\n", "\n", s)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip()


def fetch_documents(workdir):
    """[(relative path, text)] from the pinned packages, each .deb checked against its sha256 in PACKAGES."""
    import glob

    docs, debs = [], {}
    for pkg, ver, want, pattern in PACKAGES:
        subprocess.run(["apt-get", "download", f"{pkg}={ver}"], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb = next(f for f in os.listdir(workdir) if f.startswith(pkg + "_") and f.endswith(".deb"))
        digest = sha256_file(os.path.join(workdir, deb))
        if digest != want:
            raise RuntimeError(f"{deb}: sha256 {digest}, expected {want} (a different build of {pkg}={ver})")
        debs[pkg] = dict(version=ver, deb=deb, sha256=digest)
        root = os.path.join(workdir, pkg)
        subprocess.run(["dpkg-deb", "-x", os.path.join(workdir, deb), root], check=True)
        for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            raw = open(path, encoding="utf-8", errors="replace").read()
            text = clean(html_to_text(raw) if path.endswith(".html") else raw)
            if len(text) > 200:
                docs.append((os.path.relpath(path, workdir), text))
    return docs, debs


def is_val(relpath):
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) < VAL_FRACTION * 0x100000000


def train_tokenizer(texts, vocab_size, out_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(out_path)
    return tok


def build_corpus(out_dir, vocab_size=8192):
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        docs, debs = fetch_documents(work)
    train = [t for p, t in docs if not is_val(p)]
    val = [t for p, t in docs if is_val(p)]
    tok = train_tokenizer(train, vocab_size, os.path.join(out_dir, "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    sizes = {}
    for name, texts in (("train", train), ("val", val)):
        ids = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(eot)
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(os.path.join(out_dir, f"{name}.bin"))
        sizes[name] = dict(documents=len(texts), tokens=int(arr.size), sha256=hashlib.sha256(arr.tobytes()).hexdigest())
    manifest = dict(packages=debs, vocab_size=tok.get_vocab_size(), eot_id=eot, splits=sizes,
                    val_rule=f"sha256(relative path)[:8] < {VAL_FRACTION} * 2^32")
    json.dump(manifest, open(os.path.join(out_dir, "manifest.json"), "w"), indent=1)
    return manifest


class TokenFile:
    """Random windows of a uint16 token file; the batch of a step depends only on (seed, step)."""

    def __init__(self, path):
        self.ids = np.memmap(path, dtype=np.uint16, mode="r")

    def batch(self, step, batch_size, seq_len, seed, device):
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.ids) - seq_len - 1, size=batch_size)
        x = np.stack([self.ids[s:s + seq_len + 1].astype(np.int64) for s in starts])
        x = torch.from_numpy(x).to(device)
        return x[:, :-1], x[:, 1:]

    def sequential(self, seq_len, max_windows, device):
        """Non-overlapping windows from the start (validation)."""
        n = min(max_windows, (len(self.ids) - 1) // seq_len)
        for i in range(n):
            s = i * seq_len
            x = torch.from_numpy(self.ids[s:s + seq_len + 1].astype(np.int64)).to(device)
            yield x[None, :-1], x[None, 1:]


def induction_batch(step, batch_size, half_len, vocab_size, seed, device, bos=0):
    """The induction task: a random segment x of length L = half_len appears twice in a row of random tokens, at
    random places, so the distance between the copies (L to 2L) differs from row to row and no fixed relative
    position finds the answer: predicting the copy needs the induction pattern (find the earlier occurrence of the
    current token, read the token after it).

    Row: [BOS, 3L random tokens] with x written at a in [1, L] and again at b in [a + L, 2L + 1]. Inputs are the
    first 3L + 1 tokens, targets the next ones; scored are the targets x_2..x_L of the second copy (x_1 cannot be
    predicted). Returns inputs, targets [B, 3L] and the mask of the scored targets.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = 3 * half_len + 1
    seq = torch.randint(1, vocab_size, (batch_size, n), generator=g)
    seq[:, 0] = bos
    x = torch.randint(1, vocab_size, (batch_size, half_len), generator=g)
    a = torch.randint(1, half_len + 1, (batch_size,), generator=g)
    b = a + half_len + (torch.rand(batch_size, generator=g) * (2 * half_len + 2 - a - half_len)).long()
    scored = torch.zeros(batch_size, n - 1, dtype=torch.bool)
    cols = torch.arange(half_len)
    for r in range(batch_size):
        seq[r, a[r] + cols] = x[r]
        seq[r, b[r] + cols] = x[r]
        # target index j predicts seq[j + 1]; x_2..x_L of the copy sit at b + 1 .. b + L - 1
        scored[r, b[r]:b[r] + half_len - 1] = True
    inp, tgt = seq[:, :-1], seq[:, 1:]
    return inp.to(device), tgt.to(device), scored.to(device)
