//! RL training of SVF experts and their evaluation.
