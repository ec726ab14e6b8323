//! Frame -> model input tensor. Pure functions: no I/O, no model, easy to test against
//! hand-computed tensors.

use image::RgbImage;
use image::imageops::{self, FilterType};
use tract_onnx::prelude::*;

use crate::config::{ChannelOrder, Normalization, ResizeMode};

/// Memory order of the model's image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[1, 3, H, W]` (PyTorch/torchvision exports).
    Nchw,
    /// `[1, H, W, 3]` (Keras/TensorFlow exports).
    Nhwc,
}

/// Everything needed to turn a frame into the model's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputSpec {
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub normalization: Normalization,
    pub resize: ResizeMode,
}

impl InputSpec {
    pub fn shape(&self) -> [usize; 4] {
        let (h, w) = (self.height as usize, self.width as usize);
        match self.layout {
            Layout::Nchw => [1, 3, h, w],
            Layout::Nhwc => [1, h, w, 3],
        }
    }

    /// Resize (per `resize`) then normalise (per `normalization`) into a tensor of `shape()`.
    pub fn tensor(&self, frame: &RgbImage) -> Tensor {
        let fitted = self.fit(frame);
        self.normalize(&fitted)
    }

    /// The window of a `fw` x `fh` frame that is scaled to the input: all of it for
    /// `stretch`, the largest centred window with the input's aspect ratio for
    /// `center-crop`. As (x, y, width, height).
    pub fn crop_window(&self, fw: u32, fh: u32) -> (u32, u32, u32, u32) {
        match self.resize {
            ResizeMode::Stretch => (0, 0, fw, fh),
            ResizeMode::CenterCrop => {
                let (w, h) = (self.width as u64, self.height as u64);
                let (cw, ch) = if fw as u64 * h > fh as u64 * w {
                    (((fh as u64 * w) / h) as u32, fh)
                } else {
                    (fw, ((fw as u64 * h) / w) as u32)
                };
                let (cw, ch) = (cw.clamp(1, fw.max(1)), ch.clamp(1, fh.max(1)));
                ((fw - cw) / 2, (fh - ch) / 2, cw, ch)
            }
        }
    }

    /// The frame at the model's input size. Borrowed when it already is.
    pub fn fit<'a>(&self, frame: &'a RgbImage) -> std::borrow::Cow<'a, RgbImage> {
        use std::borrow::Cow;
        if frame.dimensions() == (self.width, self.height) {
            return Cow::Borrowed(frame);
        }
        let (fw, fh) = frame.dimensions();
        let (x, y, cw, ch) = self.crop_window(fw, fh);
        let cropped = (cw, ch) != (fw, fh);
        let src = cropped.then(|| imageops::crop_imm(frame, x, y, cw, ch).to_image());
        // Triangle = bilinear with an antialiasing support when shrinking (as PIL's BILINEAR).
        Cow::Owned(imageops::resize(
            src.as_ref().unwrap_or(frame),
            self.width,
            self.height,
            FilterType::Triangle,
        ))
    }

    /// Normalise an image already at the input size.
    pub fn normalize(&self, img: &RgbImage) -> Tensor {
        debug_assert_eq!(img.dimensions(), (self.width, self.height));
        self.normalize_pixels(img.pixels().map(|p| p.0.map(f32::from)))
    }

    /// Normalise `width * height` RGB pixels (0..=255, row-major) into a tensor of `shape()`.
    pub fn normalize_pixels(&self, pixels: impl Iterator<Item = [f32; 3]>) -> Tensor {
        let plane = self.width as usize * self.height as usize;
        // Per input channel c: value = (pixel[src_channel[c]] * scale - mean[c]) / std[c]
        let Normalization {
            channel_order,
            scale,
            mean: offset,
            std: div,
        } = self.normalization;
        let src_channel = match channel_order {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in pixels.take(plane).enumerate() {
            for c in 0..3 {
                let v = (px[src_channel[c]] * scale - offset[c]) / div[c];
                let at = match self.layout {
                    Layout::Nchw => c * plane + i,
                    Layout::Nhwc => i * 3 + c,
                };
                data[at] = v;
            }
        }
        // Shape and length agree by construction.
        tract_ndarray::Array4::from_shape_vec(self.shape(), data)
            .map(|a| a.into_tensor())
            .unwrap_or_else(|_| Tensor::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// 2x1 image: left pixel (10, 20, 30), right pixel (255, 0, 128).
    fn img() -> RgbImage {
        RgbImage::from_raw(2, 1, vec![10, 20, 30, 255, 0, 128]).unwrap()
    }

    fn spec(layout: Layout, normalization: Normalization) -> InputSpec {
        InputSpec {
            width: 2,
            height: 1,
            layout,
            normalization,
            resize: ResizeMode::Stretch,
        }
    }

    /// Data-driven: each preset, and normalisations set key by key, in each layout,
    /// against values worked out by hand.
    #[test]
    fn normalizations_match_hand_computed_tensors() {
        use crate::config::Preprocess;
        // A [-1, 1] model (MobileNet, EfficientNet-lite): x / 127.5 - 1.
        let minus_one_to_one = Normalization {
            channel_order: ChannelOrder::Rgb,
            scale: 1.0 / 127.5,
            mean: [1.0; 3],
            std: [1.0; 3],
        };
        // BGR on 0..1 with per-channel statistics of its own.
        let bgr_unit = Normalization {
            channel_order: ChannelOrder::Bgr,
            scale: 1.0 / 255.0,
            mean: [0.1, 0.2, 0.3],
            std: [0.5, 0.25, 2.0],
        };
        let cases: &[(Layout, Normalization, [usize; 4], [f32; 6])] = &[
            (
                Layout::Nchw,
                Preprocess::Torchvision.normalization(),
                [1, 3, 1, 2],
                [
                    (10.0 / 255.0 - 0.485) / 0.229,
                    (255.0 / 255.0 - 0.485) / 0.229,
                    (20.0 / 255.0 - 0.456) / 0.224,
                    (0.0 / 255.0 - 0.456) / 0.224,
                    (30.0 / 255.0 - 0.406) / 0.225,
                    (128.0 / 255.0 - 0.406) / 0.225,
                ],
            ),
            (
                // BGR order, channel means subtracted, no scaling.
                Layout::Nhwc,
                Preprocess::Caffe.normalization(),
                [1, 1, 2, 3],
                [
                    30.0 - 103.939,
                    20.0 - 116.779,
                    10.0 - 123.68,
                    128.0 - 103.939,
                    0.0 - 116.779,
                    255.0 - 123.68,
                ],
            ),
            (
                Layout::Nchw,
                Preprocess::Raw.normalization(),
                [1, 3, 1, 2],
                [10.0, 255.0, 20.0, 0.0, 30.0, 128.0],
            ),
            (
                Layout::Nhwc,
                Preprocess::Raw.normalization(),
                [1, 1, 2, 3],
                [10.0, 20.0, 30.0, 255.0, 0.0, 128.0],
            ),
            (
                Layout::Nchw,
                minus_one_to_one,
                [1, 3, 1, 2],
                [
                    10.0 / 127.5 - 1.0,
                    255.0 / 127.5 - 1.0,
                    20.0 / 127.5 - 1.0,
                    0.0 / 127.5 - 1.0,
                    30.0 / 127.5 - 1.0,
                    128.0 / 127.5 - 1.0,
                ],
            ),
            (
                // Input channel 0 is the frame's blue, with mean[0] and std[0].
                Layout::Nhwc,
                bgr_unit,
                [1, 1, 2, 3],
                [
                    (30.0 / 255.0 - 0.1) / 0.5,
                    (20.0 / 255.0 - 0.2) / 0.25,
                    (10.0 / 255.0 - 0.3) / 2.0,
                    (128.0 / 255.0 - 0.1) / 0.5,
                    (0.0 / 255.0 - 0.2) / 0.25,
                    (255.0 / 255.0 - 0.3) / 2.0,
                ],
            ),
        ];
        for (layout, pre, shape, want) in cases {
            let t = spec(*layout, *pre).tensor(&img());
            assert_eq!(t.shape(), shape, "{layout:?} {pre:?}");
            let got = values(&t);
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-5,
                    "{layout:?} {pre:?}: {got:?} != {want:?}"
                );
            }
        }
    }

    #[test]
    fn center_crop_keeps_the_middle() {
        // 6x2 image: columns 0-1 red, 2-3 green, 4-5 blue. A 1x1 model input crops the
        // centred 2x2 window (green) before scaling; stretch averages all three colours.
        let mut im = RgbImage::new(6, 2);
        for (x, _, p) in im.enumerate_pixels_mut() {
            p.0 = match x {
                0 | 1 => [255, 0, 0],
                2 | 3 => [0, 255, 0],
                _ => [0, 0, 255],
            };
        }
        let mut s = spec(Layout::Nhwc, crate::config::Preprocess::Raw.normalization());
        s.width = 1;
        s.height = 1;
        s.resize = ResizeMode::CenterCrop;
        assert_eq!(values(&s.tensor(&im)), &[0.0, 255.0, 0.0]);
        s.resize = ResizeMode::Stretch;
        let v = values(&s.tensor(&im));
        assert!(
            v.iter().all(|c| *c > 40.0),
            "stretch mixes all columns: {v:?}"
        );
    }
}
