//! Crafted model files (tests/common/crafted.rs) against the loader: each is refused with
//! an error naming what is wrong, none panics, none reaches the int8 kernels.

mod common;

use edgesight::config::ModelSettings;
use edgesight::model::Classifier;

#[test]
fn every_crafted_model_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    for c in common::crafted::CASES {
        let path = common::crafted::write(dir.path(), c);
        let loaded = std::panic::catch_unwind(|| Classifier::load(&ModelSettings::for_file(path)));
        let err = match loaded {
            Ok(Ok(_)) => panic!("{}: loaded", c.name),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => panic!("{}: the load panicked", c.name),
        };
        assert!(err.contains(c.error), "{}: {err}", c.name);
        assert!(
            err.contains(&format!("{}.onnx", c.name)),
            "{}: names no file: {err}",
            c.name
        );
    }
}

/// Padding as wide as a kernel is legal, so the model loads, but the conv stays with
/// tract (our kernels' geometry assumes pads narrower than the kernel).
#[test]
fn padding_as_wide_as_the_kernel_loads_and_stays_with_tract() {
    use edgesight::model::int8::qconv::Kernel;
    let dir = tempfile::tempdir().unwrap();
    let c = common::crafted::Crafted {
        name: "wide_padding",
        base: "shapes_int8_qop.onnx",
        break_it: |g| {
            let n = g
                .node
                .iter_mut()
                .find(|n| n.op_type == "QLinearConv")
                .unwrap();
            n.attribute.retain(|a| a.name != "pads");
            n.attribute.push(tract_onnx::pb::AttributeProto {
                name: "pads".into(),
                r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
                ints: vec![3, 3, 3, 3],
                ..Default::default()
            });
        },
        error: "",
    };
    let path = common::crafted::write(dir.path(), &c);
    let base = common::root().join("tests/fixtures/models").join(c.base);
    let convs = |p| {
        Classifier::load(&ModelSettings::for_file(p))
            .unwrap()
            .int8_rewrites()
            .int8_convs
    };
    let (before, after) = (convs(base), convs(path));
    if Kernel::best().is_some() {
        assert!(before > 0);
        assert_eq!(after, before - 1);
    } else {
        assert_eq!((before, after), (0, 0));
    }
}
