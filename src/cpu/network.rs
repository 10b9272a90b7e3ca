//! LeNet-5's forward and backward pass on the CPU, composed from the fast ops in [`super::fast`]
//! (the twins of the reference ops in [`super::ops`], with ReLU fused into the layer before it).

use super::fast::*;
use crate::model::*;

/// Every activation of a forward pass over one batch, named for the layer that produced it.
pub struct Activations {
    pub batch: usize,
    /// pixels / 255: [B, 1, 28, 28]
    pub input: Vec<f32>,
    /// conv1 + bias + ReLU: [B, 6, 28, 28]
    pub conv1: Vec<f32>,
    pub pool1: Vec<f32>,
    pub pool1_argmax: Vec<u32>,
    /// conv2 + bias + ReLU: [B, 16, 10, 10]
    pub conv2: Vec<f32>,
    /// [B, 16, 5, 5], read by fc1 as [B, 400]
    pub pool2: Vec<f32>,
    pub pool2_argmax: Vec<u32>,
    pub fc1: Vec<f32>,
    pub fc2: Vec<f32>,
    pub logits: Vec<f32>,
}

impl Activations {
    pub fn new(batch: usize) -> Self {
        let conv1 = batch * CONV1_CHANNELS * CONV1_SIDE * CONV1_SIDE;
        let pool1 = batch * CONV1_CHANNELS * POOL1_SIDE * POOL1_SIDE;
        let conv2 = batch * CONV2_CHANNELS * CONV2_SIDE * CONV2_SIDE;
        let pool2 = batch * FC1_IN;
        Activations {
            batch,
            input: vec![0.0; batch * IMAGE_PIXELS],
            conv1: vec![0.0; conv1],
            pool1: vec![0.0; pool1],
            pool1_argmax: vec![0; pool1],
            conv2: vec![0.0; conv2],
            pool2: vec![0.0; pool2],
            pool2_argmax: vec![0; pool2],
            fc1: vec![0.0; batch * FC1_OUT],
            fc2: vec![0.0; batch * FC2_OUT],
            logits: vec![0.0; batch * FC3_OUT],
        }
    }

    /// Fills `input` from u8 pixels: pixel / 255.
    pub fn set_input(&mut self, pixels: &[u8]) {
        assert_eq!(pixels.len(), self.input.len());
        for (x, &p) in self.input.iter_mut().zip(pixels) {
            *x = p as f32 / 255.0;
        }
    }
}

/// The forward pass over `acts.input`, writing every activation up to the logits.
pub fn forward(params: &Params, acts: &mut Activations) {
    use ParamId::*;
    let b = acts.batch;
    let (c1, c2) = (conv1_shape(b), conv2_shape(b));
    conv2d_relu_maxpool_forward(
        &mut acts.conv1,
        &mut acts.pool1,
        &mut acts.pool1_argmax,
        &acts.input,
        params.get(Conv1Weight),
        params.get(Conv1Bias),
        c1,
    );
    conv2d_relu_maxpool_forward(
        &mut acts.conv2,
        &mut acts.pool2,
        &mut acts.pool2_argmax,
        &acts.pool1,
        params.get(Conv2Weight),
        params.get(Conv2Bias),
        c2,
    );
    linear_relu_forward(
        &mut acts.fc1,
        &acts.pool2,
        params.get(Fc1Weight),
        params.get(Fc1Bias),
        b,
        FC1_IN,
        FC1_OUT,
    );
    linear_relu_forward(
        &mut acts.fc2,
        &acts.fc1,
        params.get(Fc2Weight),
        params.get(Fc2Bias),
        b,
        FC1_OUT,
        FC2_OUT,
    );
    linear_forward(
        &mut acts.logits,
        &acts.fc2,
        params.get(Fc3Weight),
        params.get(Fc3Bias),
        b,
        FC2_OUT,
        FC3_OUT,
    );
}

/// Gradient scratch space for one batch.
pub struct Gradients {
    pub params: Params,
    dlogits: Vec<f32>,
    dfc2: Vec<f32>,
    dfc1: Vec<f32>,
    dpool2: Vec<f32>,
    dconv2: Vec<f32>,
    dpool1: Vec<f32>,
    dconv1: Vec<f32>,
}

impl Gradients {
    pub fn new(batch: usize) -> Self {
        Gradients {
            params: Params::zeros(),
            dlogits: vec![0.0; batch * FC3_OUT],
            dfc2: vec![0.0; batch * FC2_OUT],
            dfc1: vec![0.0; batch * FC1_OUT],
            dpool2: vec![0.0; batch * FC1_IN],
            dconv2: vec![0.0; batch * CONV2_CHANNELS * CONV2_SIDE * CONV2_SIDE],
            dpool1: vec![0.0; batch * CONV1_CHANNELS * POOL1_SIDE * POOL1_SIDE],
            dconv1: vec![0.0; batch * CONV1_CHANNELS * CONV1_SIDE * CONV1_SIDE],
        }
    }
}

/// Loss, logits' gradient and the backward pass through every layer, leaving the parameter
/// gradients in `grads.params`. Needs the activations of [`forward`] on the same batch.
pub fn backward(params: &Params, acts: &Activations, labels: &[u32], grads: &mut Gradients) -> XentResult {
    use ParamId::*;
    let b = acts.batch;
    let (c1, c2) = (conv1_shape(b), conv2_shape(b));
    let g = grads;
    let result = softmax_xent_forward_backward(&mut g.dlogits, &acts.logits, labels, b, CLASSES);

    let [dc1w, dc1b, dc2w, dc2b, dfc1w, dfc1b, dfc2w, dfc2b, dfc3w, dfc3b] = &mut g.params.tensors;
    linear_backward_weight(dfc3w, dfc3b, &g.dlogits, &acts.fc2, b, FC2_OUT, FC3_OUT);
    linear_backward_input(&mut g.dfc2, &g.dlogits, params.get(Fc3Weight), b, FC2_OUT, FC3_OUT);
    relu_backward_in_place(&mut g.dfc2, &acts.fc2);

    linear_backward_weight(dfc2w, dfc2b, &g.dfc2, &acts.fc1, b, FC1_OUT, FC2_OUT);
    linear_backward_input(&mut g.dfc1, &g.dfc2, params.get(Fc2Weight), b, FC1_OUT, FC2_OUT);
    relu_backward_in_place(&mut g.dfc1, &acts.fc1);

    linear_backward_weight(dfc1w, dfc1b, &g.dfc1, &acts.pool2, b, FC1_IN, FC1_OUT);
    linear_backward_input(&mut g.dpool2, &g.dfc1, params.get(Fc1Weight), b, FC1_IN, FC1_OUT);

    maxpool2x2_relu_backward(
        &mut g.dconv2,
        &g.dpool2,
        &acts.pool2_argmax,
        &acts.pool2,
        b,
        CONV2_CHANNELS,
        CONV2_SIDE,
        CONV2_SIDE,
    );
    conv2d_backward_weight(dc2w, dc2b, &g.dconv2, &acts.pool1, c2);
    conv2d_backward_input(&mut g.dpool1, &g.dconv2, params.get(Conv2Weight), c2);

    maxpool2x2_relu_backward(
        &mut g.dconv1,
        &g.dpool1,
        &acts.pool1_argmax,
        &acts.pool1,
        b,
        CONV1_CHANNELS,
        CONV1_SIDE,
        CONV1_SIDE,
    );
    // conv1's input is the image: no gradient to it is needed.
    conv2d_backward_weight(dc1w, dc1b, &g.dconv1, &acts.input, c1);
    result
}

/// Adam over every parameter tensor.
pub fn adam_step(state: &mut TrainState, grads: &Params, config: &AdamConfig) {
    state.step += 1;
    let step = config.step(state.step);
    for i in 0..PARAM_SPECS.len() {
        adam_update(
            &mut state.params.tensors[i],
            &grads.tensors[i],
            &mut state.adam_m.tensors[i],
            &mut state.adam_v.tensors[i],
            config,
            step,
        );
    }
}
