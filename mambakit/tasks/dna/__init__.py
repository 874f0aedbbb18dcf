"""DNA: genomes from FASTA/FASTQ (fasta.py), one token per base (tokenizer.py), held-out splits
and training windows (splits.py), the order-k Markov baseline (markov.py), and two tasks:
`mambakit train --task dna` (task.py: a causal language model, in held-out bits per base) and
`mambakit train --task dna-classify` (classify.py: genome windows against samples with the same
k-mer statistics, for the causal, bidirectional and reverse-complement-equivariant backbones)."""
