//! Verifiers: is a generated answer right? (Filled in by the verifiers work.)
