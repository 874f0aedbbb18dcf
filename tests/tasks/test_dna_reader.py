"""The FASTA/FASTQ reader against hand-made files: multi-line records, lowercase, N runs, blank
lines, Windows line ends, FASTQ over several lines, compressed with gzip, xz and bzip2, files and
directories; both backends (plain Python, and pyfastx where installed) read the same records;
bad files are ValueErrors that name them."""

import bz2
import gzip
import lzma
from importlib.util import find_spec

import pytest

from mambakit.tasks.dna import fasta
from mambakit.tasks.dna.splits import load_genomes

FASTA = (">chr1 a description\nACGTacgtNN\nNNNNggcc\n\nTTAA\n"
         ">plasmid_2\nnnnnACGT\n"
         ">empty\n"
         ">last\r\nGATTACA\r\n")
FASTA_RECORDS = [("chr1", b"ACGTacgtNNNNNNggccTTAA"), ("plasmid_2", b"nnnnACGT"), ("empty", b""), ("last", b"GATTACA")]
FASTQ = ("@read1 extra\nACGTN\n+\nIIIII\n"
         "@read2\nacgt\nTTGG\n+read2\n!!!!\n####\n"  # sequence and quality over two lines each
         "@read3\nGG\n+\n@@\n")  # a quality line may start with '@'
FASTQ_RECORDS = [("read1", b"ACGTN"), ("read2", b"acgtTTGG"), ("read3", b"GG")]
BACKENDS = ["python", pytest.param("pyfastx", marks=pytest.mark.skipif(find_spec("pyfastx") is None,
                                                                       reason="pyfastx is not installed"))]
WRITERS = {"": lambda p, b: p.write_bytes(b), ".gz": lambda p, b: p.write_bytes(gzip.compress(b)),
           ".xz": lambda p, b: p.write_bytes(lzma.compress(b)), ".bz2": lambda p, b: p.write_bytes(bz2.compress(b))}


def write(path, text: str, suffix: str = ""):
    path = path.with_name(path.name + suffix)
    WRITERS[suffix](path, text.encode())
    return path


def readable(backend: str, suffix: str) -> bool:
    return backend == "python" or suffix in ("", ".gz")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suffix", list(WRITERS))
def test_fasta_records(tmp_path, backend, suffix):
    path = write(tmp_path / "genome.fa", FASTA, suffix)
    if not readable(backend, suffix):
        with pytest.raises(ValueError, match="pyfastx reads plain and gzip files only"):
            fasta.read_file(path, backend)
        return
    records = fasta.read_file(path, backend)
    assert [(r.name, r.seq) for r in records] == FASTA_RECORDS
    assert {r.source for r in records} == {str(path)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_fastq_records(tmp_path, backend, suffix):
    path = write(tmp_path / "reads.fq", FASTQ, suffix)
    if not readable(backend, suffix):
        pytest.skip("pyfastx does not read xz")
    assert [(r.name, r.seq) for r in fasta.read_file(path, backend)] == FASTQ_RECORDS


def test_auto_backend_reads_xz_with_the_plain_parser(tmp_path):
    path = write(tmp_path / "genome.fna", FASTA, ".xz")
    assert fasta.pick_backend(path) == "python"
    assert [(r.name, r.seq) for r in fasta.read_file(path)] == FASTA_RECORDS


def test_directories_are_searched_recursively_for_sequence_files(tmp_path):
    (tmp_path / "sub").mkdir()
    a = write(tmp_path / "b_strain.fasta", FASTA, ".gz")
    b = write(tmp_path / "sub" / "a_strain.fna", FASTA, ".xz")
    write(tmp_path / "notes.txt", "not a genome")
    assert fasta.find_files(tmp_path) == sorted([a, b], key=str)
    records = fasta.read_records([tmp_path])
    assert len(records) == 2 * len(FASTA_RECORDS) and records[0].source == str(a)  # sorted by path
    with pytest.raises(ValueError, match="no such file or directory"):
        fasta.find_files(tmp_path / "missing.fa")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no FASTA/FASTQ file"):
        fasta.find_files(tmp_path / "nothing")


def test_genomes_tokenized_with_ambiguity_codes_counted(tmp_path):
    path = write(tmp_path / "g.fa", ">a\nACGTRYACGTACGTACGTACGTACGTACGTACGTACGTACGTACGTAC\n>b\nuuuu\n")
    genomes = load_genomes(path)
    assert genomes.n_ambiguous == 2 and [s.name for s in genomes.sequences] == ["a", "b"]
    assert genomes.sequences[0].ids[:8].tolist() == [0, 1, 2, 3, 4, 4, 0, 1]
    assert genomes.sequences[1].ids.tolist() == [3, 3, 3, 3]  # RNA's U is T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("content, message", [
    ("", "holds no bases"),
    ("\n\n  \n", "holds no bases"),
    (">only_headers\n>another\n", "holds no bases"),
    ("just some text\nACGT\n", "not FASTA or FASTQ"),
])
def test_empty_and_malformed_files_name_the_file(tmp_path, backend, content, message):
    path = write(tmp_path / "bad.fa", content)
    with pytest.raises(ValueError, match=message) as err:
        fasta.read_file(path, backend)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_file_is_refused(tmp_path, backend):
    path = tmp_path / "image.fa"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="binary file") as err:
        fasta.read_file(path, backend)
    assert str(path) in str(err.value)


def test_corrupt_compressed_file_is_refused(tmp_path):
    path = tmp_path / "broken.fa.gz"
    path.write_bytes(gzip.compress(FASTA.encode())[:30])
    with pytest.raises(ValueError, match="cannot be read as a gzip file") as err:
        fasta.read_file(path, "python")
    assert str(path) in str(err.value)


def test_fastq_with_missing_quality_is_refused(tmp_path):
    path = write(tmp_path / "short.fq", "@r1\nACGT\n+\nII\n")
    with pytest.raises(ValueError, match="4 bases and 2 quality values"):
        fasta.read_file(path, "python")


PROTEIN = ">sp|P69905|HBA_HUMAN Hemoglobin subunit alpha\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL\n"


def test_protein_fasta_is_refused_naming_file_and_record(tmp_path):
    path = write(tmp_path / "protein.fa", PROTEIN)
    with pytest.raises(ValueError, match=r"record 'sp\|P69905\|HBA_HUMAN' is not DNA: .* the first 'L'") as err:
        load_genomes(path)
    assert str(path) in str(err.value)


def test_protein_of_only_iupac_letters_is_refused(tmp_path):
    # every letter of this peptide is also an IUPAC nucleotide code: the character check passes it
    path = write(tmp_path / "peptide.fa", ">pep\nMKRSTAVDGHWYBMKRSTAVDGHWYBMKRSTAVDGHWYB\n")
    with pytest.raises(ValueError, match="is not DNA: .* are IUPAC ambiguity codes") as err:
        load_genomes(path)
    assert str(path) in str(err.value)
