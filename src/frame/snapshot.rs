//! A frame as a JPEG that fits a size limit (the `snapshot` command, within the broker's
//! packet limit).

use std::io::Cursor;

use image::RgbImage;

/// Why no snapshot could be made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("JPEG encoding failed: {0}")]
    Encode(#[from] image::ImageError),
    #[error("no JPEG of this frame fits {max} bytes")]
    TooLarge { max: usize },
}

/// JPEG of `img`, re-encoded smaller (lower quality, then half size) until it fits `max`
/// bytes.
pub fn snapshot_jpeg(img: &RgbImage, max: usize) -> Result<Vec<u8>, SnapshotError> {
    let mut img = std::borrow::Cow::Borrowed(img);
    loop {
        for quality in [85u8, 60, 40] {
            let mut out = Cursor::new(Vec::new());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
                .encode_image(img.as_ref())?;
            if out.get_ref().len() <= max {
                return Ok(out.into_inner());
            }
        }
        if img.width() <= 16 || img.height() <= 16 {
            return Err(SnapshotError::TooLarge { max });
        }
        img = std::borrow::Cow::Owned(image::imageops::resize(
            img.as_ref(),
            img.width() / 2,
            img.height() / 2,
            image::imageops::FilterType::Triangle,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_shrink_to_fit() {
        // Noise compresses badly: a 640x480 noise frame is far over 20 kB at quality 85.
        let mut x = 1u32;
        let img = RgbImage::from_fn(640, 480, |_, _| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Rgb([(x >> 24) as u8, (x >> 16) as u8, (x >> 8) as u8])
        });
        let big = snapshot_jpeg(&img, usize::MAX).unwrap();
        let small = snapshot_jpeg(&img, 20_000).unwrap();
        assert!(big.len() > 20_000 && small.len() <= 20_000);
        let back = image::load_from_memory(&small).unwrap();
        assert!(back.width() < 640, "downscaled to fit");
    }
}
