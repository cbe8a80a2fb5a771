"""Related attacks from the same literature: split-model inversion, Data-from-Model, BNN inversion by SAT."""
