//! The optimizers, each exactly as PyTorch's, each a descriptor in a module of its own
//! ([`adam`], [`sgd`], [`adamw`], [`rmsprop`]): its settings with their validation and the
//! command-line flags it reads, its state tensors, the scalars of one step, and its element
//! update. Its twin on the GPU is one WGSL function in `shaders/optim.wgsl` of the same name,
//! which the one generic update kernel calls (src/gpu/kernels.rs writes an entry point per
//! optimizer of [`RULES`]). Everything else derives from the list in \[`optimizers!`\]: the
//! checkpoint's state names (`<optimizer>.<state>.<parameter>`), the `--optimizer` values, the op
//! checks and the bench's rows.
//!
//! Hyper-parameters are f64, as Python floats are; the scalars of each step are derived from
//! them in f64 and rounded once to f32, as PyTorch does when it hands a Python scalar to a float
//! kernel. The element update is the specification: the CPU reference and the fast CPU path both
//! call it (so they round alike), and the WGSL function repeats it operation for operation.

use std::fmt;

use anyhow::{bail, Result};

pub mod adam;
pub mod adamw;
pub mod rmsprop;
pub mod sgd;

pub use adam::Adam;
pub use adamw::AdamW;
pub use rmsprop::RmsProp;
pub use sgd::Sgd;

/// The f32 scalars of one step an optimizer gets: the step uniform's `opt0..opt7` on the GPU.
pub const SCALARS: usize = 8;
/// One step's scalars, in the optimizer's own order (each module names them).
pub type Scalars = [f32; SCALARS];
/// The most state tensors per parameter an optimizer keeps (the update kernel's `state0..`).
pub const MAX_STATES: usize = 3;

/// One state tensor an optimizer keeps per parameter, laid out as the parameter. Every state
/// starts at zero, as torch's `zeros_like`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    /// PyTorch's name for it (or the name checkpoints have always used): the checkpoint stores
    /// it as `<optimizer>.<name>.<parameter>`.
    pub name: &'static str,
    /// A running mean of squares: never negative (a loaded checkpoint's negative value is
    /// corrupt; the op checks draw it positive).
    pub non_negative: bool,
    /// The size of its values, for the op checks' tolerances.
    pub scale: Scale,
}

/// What a state's values are made of (the op checks' error bound derives from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Gradients (a momentum buffer, a running mean of gradients).
    Grad,
    /// Squared gradients.
    GradSquared,
    /// Steps: gradients divided by a root mean square (RMSprop's momentum buffer).
    Step,
}

/// The optimizer flags of `lenet train`, as given (None: not given).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flags {
    pub momentum: Option<f64>,
    pub nesterov: bool,
    pub weight_decay: Option<f64>,
    pub alpha: Option<f64>,
    pub centered: bool,
}

impl Flags {
    /// The flags given, by their names on the command line.
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("--momentum", self.momentum.is_some()),
            ("--nesterov", self.nesterov),
            ("--weight-decay", self.weight_decay.is_some()),
            ("--alpha", self.alpha.is_some()),
            ("--centered", self.centered),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// A metadata lookup (a checkpoint's string metadata).
pub type Meta<'a> = &'a dyn Fn(&str) -> Option<String>;

/// An optimizer: what the rest of the program needs of it.
pub trait Rule: Copy + fmt::Debug + Default + PartialEq + Into<OptimizerKind> + 'static {
    /// The `--optimizer` value, the checkpoint's prefix and `optimizer` metadata, and the name of
    /// its WGSL function.
    const NAME: &'static str;
    /// Its PyTorch twin, with the settings it takes (for the help and the docs).
    const TORCH: &'static str;
    /// Its state tensors, in the order [`Rule::element`] reads them.
    const STATES: &'static [State];
    /// The flags of [`Flags`] it reads; the others are refused.
    const FLAGS: &'static [&'static str];
    /// What OneCycleLR cycles, as PyTorch does (`beta1` where the optimizer has betas, else
    /// `momentum`); None where PyTorch refuses to cycle (an optimizer with neither).
    const CYCLED: Option<&'static str>;

    /// The settings the flags give, on top of `base` (the default, or a resumed run's).
    fn from_flags(flags: &Flags, base: Self) -> Self;
    /// Refuses what PyTorch refuses, naming the settings as `n` says.
    fn validate(&self, n: Naming) -> Result<()>;
    /// The settings in a few words, after the learning rate (`betas 0.9/0.999, eps 1e-08`).
    fn describe(&self) -> String;
    /// The settings as checkpoint metadata (beside `optimizer` and `lr`).
    fn metadata(&self) -> Vec<(&'static str, String)>;
    /// The inverse of [`Rule::metadata`].
    fn from_metadata(get: Meta) -> Result<Self>;
    /// The scalars of step `t` (1-based, as torch counts) at learning rate `lr`, with `cycled`
    /// replacing what [`Rule::CYCLED`] names when a schedule cycles it.
    fn scalars(&self, t: u64, lr: f64, cycled: Option<f64>) -> Scalars;
    /// One element's update: the parameter `p`, its gradient `g` (the partials summed), its
    /// states `s` in [`Rule::STATES`] order.
    fn element(k: &Scalars, p: &mut f32, g: f32, s: &mut [f32; MAX_STATES]);
}

/// [`update_span`]'s signature: scalars, the span's parameters, the gradient, the tensor's size,
/// the span's first element, its states.
type SpanFn = fn(&Scalars, &mut [f32], &[f32], usize, usize, &mut [&mut [f32]]);

/// What the rest of the program sees of a [`Rule`], without its type.
#[derive(Clone, Copy, Debug)]
pub struct Descriptor {
    pub name: &'static str,
    pub torch: &'static str,
    pub states: &'static [State],
    pub flags: &'static [&'static str],
    pub cycled: Option<&'static str>,
    /// [`Rule::element`] over the elements of a span (see [`update_span`]).
    span: SpanFn,
    default: fn() -> OptimizerKind,
}

impl Descriptor {
    const fn of<R: Rule>() -> Self {
        Descriptor {
            name: R::NAME,
            torch: R::TORCH,
            states: R::STATES,
            flags: R::FLAGS,
            cycled: R::CYCLED,
            span: span::<R>,
            default: default_of::<R>,
        }
    }

    /// The optimizer with its default settings.
    pub fn default_kind(&self) -> OptimizerKind {
        (self.default)()
    }
}

fn default_of<R: Rule>() -> OptimizerKind {
    R::default().into()
}

/// The optimizers: one line each. The enum of their settings and its dispatch follow from it.
macro_rules! optimizers {
    ($($variant:ident($ty:ty)),+ $(,)?) => {
        /// Which optimizer, with its own hyper-parameters.
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub enum OptimizerKind {
            $($variant($ty),)+
        }

        $(impl From<$ty> for OptimizerKind {
            fn from(o: $ty) -> Self {
                OptimizerKind::$variant(o)
            }
        })+

        /// Every optimizer, in `--optimizer`'s order.
        pub const RULES: &[Descriptor] = &[$(Descriptor::of::<$ty>(),)+];

        /// Calls `$body` with `$o` bound to the settings and `$R` to their type.
        macro_rules! with_rule {
            ($kind:expr, |$o:ident: $R:ident| $body:expr) => {
                match $kind {
                    $(OptimizerKind::$variant($o) => {
                        #[allow(dead_code)]
                        type $R = $ty;
                        $body
                    })+
                }
            };
        }
    };
}

optimizers!(Adam(Adam), Sgd(Sgd), AdamW(AdamW), RmsProp(RmsProp));

/// The descriptor named `name`.
pub fn rule(name: &str) -> Option<&'static Descriptor> {
    RULES.iter().find(|d| d.name == name)
}

/// The first listed optimizer that takes every one of `flags` (`--momentum`, ...): what a
/// resumed run's options are checked as before its checkpoint says which optimizer it has.
pub fn accepting(flags: &[&str]) -> Option<&'static Descriptor> {
    RULES.iter().find(|d| flags.iter().all(|f| d.flags.contains(f)))
}

/// The `--optimizer` values, as a phrase ("adam, sgd, adamw or rmsprop").
pub fn names() -> String {
    phrase(&RULES.iter().map(|d| d.name).collect::<Vec<_>>())
}

/// "a, b or c".
fn phrase(names: &[&str]) -> String {
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// Every optimizer's state names (`adam.m`, ...): a tensor `<one of these>.<parameter>` in a
/// checkpoint is optimizer state.
pub fn all_state_names() -> Vec<String> {
    RULES.iter().flat_map(|d| d.states.iter().map(move |s| format!("{}.{}", d.name, s.name))).collect()
}

impl OptimizerKind {
    /// Its descriptor.
    pub fn descriptor(&self) -> &'static Descriptor {
        with_rule!(self, |_o: R| rule(R::NAME).expect("listed"))
    }
}

/// An optimizer and its (peak) learning rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
}

impl Default for Optimizer {
    /// The contract's recipe: Adam, lr 1e-3, betas 0.9/0.999, eps 1e-8.
    fn default() -> Self {
        Optimizer { kind: OptimizerKind::Adam(Adam::default()), lr: 1e-3 }
    }
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (torch, more) = with_rule!(self.kind, |o: R| (R::TORCH, o.describe()));
        let class = torch.split('(').next().unwrap_or(torch).trim_start_matches("torch.optim.");
        write!(f, "{class} (lr {}{}{more})", self.lr, if more.is_empty() { "" } else { ", " })
    }
}

/// One step's scalars for whichever optimizer runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptStep {
    /// The optimizer's [`Rule::NAME`].
    pub optimizer: &'static str,
    pub scalars: Scalars,
}

impl OptStep {
    /// Its optimizer's descriptor.
    pub fn descriptor(&self) -> &'static Descriptor {
        rule(self.optimizer).expect("steps are made by listed optimizers")
    }

    /// How many state tensors per parameter its update reads and writes.
    pub fn moments(&self) -> usize {
        self.descriptor().states.len()
    }
}

impl Optimizer {
    /// Its descriptor.
    pub fn descriptor(&self) -> &'static Descriptor {
        self.kind.descriptor()
    }

    /// The names of the state buffers, one tensor per parameter each, as the checkpoint stores
    /// them (`<optimizer>.<state>`, then `.<parameter>`).
    pub fn state_names(&self) -> Vec<String> {
        let d = self.descriptor();
        d.states.iter().map(|s| format!("{}.{}", d.name, s.name)).collect()
    }

    /// Refuses settings PyTorch refuses (or that would climb the loss), naming them as the
    /// checkpoint's metadata does.
    pub fn validate(&self) -> Result<()> {
        self.validate_as(Naming::Metadata)
    }

    /// [`Optimizer::validate`], naming the settings as `n` says.
    pub fn validate_as(&self, n: Naming) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("{} = {} must be a finite number > 0", n.name("lr"), self.lr);
        }
        with_rule!(self.kind, |o: R| o.validate(n))
    }

    /// The optimizer named `name` (None: `base`'s) with the flags on top of `base`'s settings
    /// where it is the same optimizer, else of its defaults. Flags the optimizer does not read
    /// are refused, naming the optimizers that do.
    pub fn from_flags(name: Option<&str>, flags: &Flags, base: Optimizer) -> Result<Optimizer> {
        let d = match name {
            Some(name) => match rule(name) {
                Some(d) => d,
                None => bail!("--optimizer {name:?} is not {}", names()),
            },
            None => base.descriptor(),
        };
        let foreign: Vec<&str> = flags.given().into_iter().filter(|f| !d.flags.contains(f)).collect();
        if let Some(flag) = foreign.first() {
            let readers: Vec<&str> =
                RULES.iter().filter(|r| r.flags.contains(flag)).map(|r| r.name).collect();
            bail!(
                "{} not a setting of --optimizer {} (lenet's {} takes {}); {flag} is read by --optimizer {}",
                if foreign.len() > 1 { format!("{} are", phrase(&foreign)) } else { format!("{flag} is") },
                d.name,
                d.name,
                if d.flags.is_empty() { "none".to_string() } else { phrase(d.flags) },
                phrase(&readers)
            );
        }
        let base_kind = if base.descriptor().name == d.name { base.kind } else { d.default_kind() };
        let kind = with_rule!(base_kind, |o: R| R::from_flags(flags, o).into());
        Ok(Optimizer { kind, lr: base.lr })
    }

    /// The scalars of step `t` (1-based, as torch counts) taken at learning rate `lr`, with
    /// `momentum` replacing what the optimizer's [`Descriptor::cycled`] names when a schedule
    /// cycles it.
    pub fn step(&self, t: u64, lr: f64, momentum: Option<f64>) -> OptStep {
        with_rule!(self.kind, |o: R| OptStep { optimizer: R::NAME, scalars: o.scalars(t, lr, momentum) })
    }

    /// The metadata a checkpoint stores for these settings.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        // Rust prints the shortest decimal that parses back to the same f64: exact round trip.
        let mut m = vec![("lr", self.lr.to_string()), ("optimizer", self.descriptor().name.to_string())];
        m.extend(with_rule!(self.kind, |o: R| o.metadata()));
        m
    }

    /// The inverse of [`Optimizer::metadata`]; files from before SGD existed have no
    /// `optimizer` key and are Adam. Validates the values as the command line does.
    pub fn from_metadata(get: Meta) -> Result<Self> {
        let name = get("optimizer").unwrap_or_else(|| Adam::NAME.to_string());
        let Some(d) = rule(&name) else { bail!("optimizer = {name:?} is not {}", names()) };
        let kind = with_rule!(d.default_kind(), |_o: R| R::from_metadata(get)?.into());
        let opt = Optimizer { kind, lr: float(get, "lr")? };
        opt.validate()?;
        Ok(opt)
    }
}

/// A finite f64 metadata value.
pub fn float(get: Meta, key: &str) -> Result<f64> {
    let Some(v) = get(key) else { bail!("{key} is missing") };
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => bail!("{key} = {v:?} is not a finite number"),
    }
}

/// [`Rule::metadata`] and [`Rule::from_metadata`] for settings that are the type's fields, each
/// stored under its own name and read back by its parser ([`float`] or [`boolean`]): one list,
/// so the two directions cannot disagree on a key.
macro_rules! settings_as_metadata {
    ($ty:ident { $($field:ident: $parse:ident),* $(,)? }) => {
        fn metadata(&self) -> Vec<(&'static str, String)> {
            vec![$((stringify!($field), self.$field.to_string())),*]
        }

        fn from_metadata(get: Meta) -> Result<Self> {
            Ok($ty { $($field: $parse(get, stringify!($field))?),* })
        }
    };
}
pub(crate) use settings_as_metadata;

/// A true/false metadata value.
pub fn boolean(get: Meta, key: &str) -> Result<bool> {
    match get(key).as_deref() {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        v => bail!("{key} = {v:?} is not true or false"),
    }
}

/// How an error names a setting: as the checkpoint's metadata (`weight_decay`) or as the
/// command line (`--weight-decay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    Metadata,
    Flags,
}

impl Naming {
    /// The setting `key` (a metadata key) as this naming spells it.
    pub fn name(self, key: &str) -> String {
        match self {
            Naming::Metadata => key.to_string(),
            Naming::Flags => format!("--{}", key.replace('_', "-")),
        }
    }
}

/// Refuses a setting outside [lo, hi) (`hi` None: no upper bound).
pub fn check_range(n: Naming, key: &str, x: f64, lo: f64, hi: Option<f64>) -> Result<()> {
    let inside = x.is_finite() && x >= lo && hi.is_none_or(|hi| x < hi);
    let name = n.name(key);
    if !inside {
        match hi {
            Some(hi) => bail!("{name} = {x} must be in [{lo}, {hi})"),
            None => bail!("{name} = {x} must be a finite number >= {lo}"),
        }
    }
    Ok(())
}

/// The gradient of element `i` of a tensor of `n` whose gradient buffer holds partial sums of
/// `n` each: the partials added in order, the first one first.
#[inline]
pub fn summed_grad(grad: &[f32], n: usize, i: usize) -> f32 {
    let mut g = grad[i];
    let mut at = i + n;
    while at < grad.len() {
        g += grad[at];
        at += n;
    }
    g
}

/// One step of `step`'s optimizer over elements `first..first + param.len()` of a tensor of `n`
/// elements whose gradient (partials of `n` each) is `grad`: one streamed pass, each element's
/// partials summed as it is updated. `states` hold the same elements as `param`, in the
/// optimizer's [`Rule::STATES`] order. The CPU reference and the fast path both step through
/// here.
pub fn update_span(
    step: &OptStep,
    param: &mut [f32],
    grad: &[f32],
    n: usize,
    first: usize,
    states: &mut [&mut [f32]],
) {
    let d = step.descriptor();
    assert!(
        states.len() == d.states.len() && states.iter().all(|s| s.len() == param.len()),
        "{} keeps {} states per element",
        d.name,
        d.states.len()
    );
    (d.span)(&step.scalars, param, grad, n, first, states)
}

fn span<R: Rule>(
    k: &Scalars,
    param: &mut [f32],
    grad: &[f32],
    n: usize,
    first: usize,
    states: &mut [&mut [f32]],
) {
    // One loop per state count, each zipping the slices, so the element update inlines into a
    // plain pass without bounds checks.
    let g = |j: usize| summed_grad(grad, n, first + j);
    match states {
        [] => {
            for (j, p) in param.iter_mut().enumerate() {
                R::element(k, p, g(j), &mut [0.0; MAX_STATES]);
            }
        }
        [a] => {
            for (j, (p, a)) in param.iter_mut().zip(a.iter_mut()).enumerate() {
                let mut s = [*a, 0.0, 0.0];
                R::element(k, p, g(j), &mut s);
                *a = s[0];
            }
        }
        [a, b] => {
            for (j, ((p, a), b)) in param.iter_mut().zip(a.iter_mut()).zip(b.iter_mut()).enumerate() {
                let mut s = [*a, *b, 0.0];
                R::element(k, p, g(j), &mut s);
                (*a, *b) = (s[0], s[1]);
            }
        }
        [a, b, c] => {
            let states = a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut());
            for (j, (p, ((a, b), c))) in param.iter_mut().zip(states).enumerate() {
                let mut s = [*a, *b, *c];
                R::element(k, p, g(j), &mut s);
                (*a, *b, *c) = (s[0], s[1], s[2]);
            }
        }
        _ => unreachable!("at most {MAX_STATES} states"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_is_validated() {
        let mut all = vec![Optimizer::default()];
        all.extend(RULES.iter().map(|d| Optimizer { kind: d.default_kind(), lr: 0.05 }));
        all.push(Optimizer {
            kind: Sgd { momentum: 0.9, nesterov: true, weight_decay: 5e-4 }.into(),
            lr: 0.05,
        });
        all.push(Optimizer {
            kind: RmsProp { alpha: 0.9, eps: 1e-7, weight_decay: 1e-3, momentum: 0.5, centered: true }.into(),
            lr: 0.01,
        });
        for opt in all {
            let meta = opt.metadata();
            let get = |k: &str| meta.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone());
            assert_eq!(Optimizer::from_metadata(&get).unwrap(), opt);
        }
        let bad = |k: &str| match k {
            "lr" => Some("-1e-3".to_string()),
            "beta1" => Some("0.9".into()),
            "beta2" => Some("0.999".into()),
            "eps" => Some("1e-8".into()),
            _ => None,
        };
        let err = Optimizer::from_metadata(&bad).unwrap_err().to_string();
        assert!(err.contains("lr = -0.001 must be"), "{err}");
        let beta = |k: &str| if k == "beta1" { Some("1".to_string()) } else { bad(k).map(|_| "0.5".into()) };
        let err = Optimizer::from_metadata(&beta).unwrap_err().to_string();
        assert!(err.contains("beta1 = 1 must be in [0, 1)"), "{err}");
    }

    #[test]
    fn state_names_derive_from_the_descriptors() {
        let all = all_state_names();
        for name in ["adam.m", "adam.v", "sgd.momentum", "adamw.m", "adamw.v", "rmsprop.square_avg"] {
            assert!(all.iter().any(|n| n == name), "{name} missing from {all:?}");
        }
        assert_eq!(all.len(), RULES.iter().map(|d| d.states.len()).sum::<usize>());
        assert!(RULES.iter().all(|d| d.states.len() <= MAX_STATES));
        assert_eq!(names(), "adam, sgd, adamw or rmsprop");
    }

    #[test]
    fn foreign_flags_are_refused_naming_their_readers() {
        let flags = Flags { alpha: Some(0.9), ..Default::default() };
        let err = Optimizer::from_flags(Some("adam"), &flags, Optimizer::default()).unwrap_err().to_string();
        assert!(err.contains("--alpha is not a setting of --optimizer adam"), "{err}");
        assert!(err.contains("--optimizer rmsprop"), "{err}");
        let rms = Optimizer::from_flags(Some("rmsprop"), &flags, Optimizer::default()).unwrap();
        assert_eq!(rms.kind, RmsProp { alpha: 0.9, ..Default::default() }.into());
        assert!(Optimizer::from_flags(Some("lion"), &flags, Optimizer::default()).is_err());
    }
}
