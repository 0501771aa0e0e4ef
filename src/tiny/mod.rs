//! A tiny LLaMA trained from scratch, with our own differentiable forward pass, on hierarchical
//! equality (`tasks::equality`): the ground-truth model for DAS, where the high-level variables
//! are known to be computed (IIT pins a==b to a chosen subspace). `arch` is its shape and
//! tokenizer, `task` the training and scoring examples, `iit` the interchange training, `train`
//! the loop, `save` the Hugging Face directory it ships as (`data/models/tiny-equality`), and
//! `patching` the activation-patching table that checks which sites hold which variable.
pub mod arch;
pub mod iit;
pub mod patching;
pub mod save;
pub mod task;
pub mod train;

pub use arch::{build_tokenizer, llama_config, vocab, TinyArch, PAD, UNK};
pub use iit::iit_accuracy;
pub use patching::{equality_patching, patching_table, PatchCell};
pub use save::{save, IIT_SUBSPACE_FILE};
pub use task::accuracy;
pub use train::{train, TrainOpts, Trained};
