//! Shared nothing: the programs in this folder are cargo examples; see README.md.
