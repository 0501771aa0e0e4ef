//! road-dii: distributed interchange interventions and RoAd on LLaMA-family models.
pub mod bench;
pub mod cli;
pub mod fetch;
pub mod generate;
pub mod model;
pub mod road;
pub mod tokenizer;
