//! Interchange-intervention training (IIT, Geiger et al., 2022) on the tiny model: which variable
//! a step swaps, where it lives (b for a==b, d for c==d), the counterfactual answers, and the
//! interchanged forward that both the training loss and the held-out IIT accuracy run.
use super::task::{batch_acc, last_logits_hooked, TaskIds};
use crate::intervene::replace::Replace;
use crate::model::{Collector, Fwd, Llama, LogitsAt, Site};
use crate::tasks::equality::{self, Variable};
use crate::tokenizer::Tok;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;

/// What an IIT step trains, cycling: the variable (a==b, and c==d too when `right`), and
/// whether the subspace (the answer follows the source's variable) or everything but it (the
/// answer must not change: nothing else at that position may matter) is swapped. The
/// complement half only exists with a subspace.
pub(crate) fn iit_step(step: usize, with_complement: bool, right: bool) -> (Variable, bool) {
    let vars = if right { 2 } else { 1 };
    let modes = if with_complement { 2 } else { 1 };
    let k = step % (vars * modes);
    let var = if k % vars == 0 { Variable::Left } else { Variable::Right };
    (var, k / vars == 1)
}

/// The prompt position IIT puts a variable at: b for a==b, d for c==d (`a b c d =`).
pub(crate) fn iit_position(var: Variable) -> Result<usize> {
    match var {
        Variable::Left => Ok(1),
        Variable::Right => Ok(3),
        Variable::Output => bail!("IIT is defined for the left and right equalities"),
    }
}

/// Counterfactual answer ids when `var` is taken from `src` into `base` (prompts `a b c d =`);
/// with `complement` (everything but the variable taken), the base's own answers.
pub(crate) fn iit_labels(var: Variable, base: &[Vec<u32>], src: &[Vec<u32>], ans: (u32, u32), complement: bool) -> Vec<u32> {
    base.iter()
        .zip(src)
        .map(|(b, s)| {
            let (vb, vs) = ((b[0] == b[1], b[2] == b[3]), (s[0] == s[1], s[2] == s[3]));
            let out = if complement { equality::counterfactual(var, vb, vb) } else { equality::counterfactual(var, vb, vs) };
            if out {
                ans.0
            } else {
                ans.1
            }
        })
        .collect()
}

/// Last-position logits of `base` with block `layer`'s output at `pos` taken from the `src` run:
/// the whole vector, or its part in the span of `basis` rows (gradients flow into both runs when
/// `differentiable`).
pub(crate) fn interchanged_logits(
    model: &Llama,
    base: &[Vec<u32>],
    src: &[Vec<u32>],
    (layer, pos): (usize, usize),
    basis: Option<&Tensor>,
    complement: bool,
    differentiable: bool,
) -> Result<Tensor> {
    let mut col = Collector::new(vec![(layer, Site::BlockOutput)]);
    model.forward(src, Fwd { hooks: Some(&mut col), logits: LogitsAt::None, differentiable, ..Default::default() })?;
    let source = col.get(layer, Site::BlockOutput).context("collected source activation")?;
    let mut hook = Replace::from_source(layer, Site::BlockOutput, pos, source)?.within(basis.cloned(), complement);
    last_logits_hooked(model, base, differentiable, Some(&mut hook))
}

/// Interchange-intervention accuracy (argmax over the whole vocabulary) of the swap at block
/// `layer` (position b for a==b, d for c==d; whole vector or the `basis` subspace) on `n` fresh
/// pairs over all symbols.
pub fn iit_accuracy(
    model: &Llama,
    tok: &Tok,
    layer: usize,
    basis: Option<&Tensor>,
    complement: bool,
    var: Variable,
    n: usize,
    seed: u64,
) -> Result<f64> {
    let pos = iit_position(var)?;
    let ids = TaskIds::new(tok)?;
    let mut rng = Rng::new(seed);
    let (mut correct, mut done) = (0.0, 0);
    while done < n {
        let m = (n - done).min(512);
        let (base, _) = ids.sample(tok, &mut rng, m, 0.5)?;
        let (src, _) = ids.sample(tok, &mut rng, m, 0.5)?;
        let cf = iit_labels(var, &base, &src, ids.ans, complement);
        correct += batch_acc(&interchanged_logits(model, &base, &src, (layer, pos), basis, complement, false)?, &cf)? * m as f64;
        done += m;
    }
    Ok(correct / n as f64)
}
