//! Which Vulkan devices ggml may use. ggml takes the indices of Vulkan's own
//! device list from `GGML_VK_VISIBLE_DEVICES` and, without it, only
//! discrete and integrated GPUs: a CPU-type device (Mesa's lavapipe) or a
//! virtual one must be named. An index past the list's end makes ggml drop
//! every Vulkan device and go on with the CPU alone, saying so only on
//! stderr ("Invalid device index"); so the indices are checked here against
//! Vulkan's list (read through the Vulkan loader, `ash`) before ggml reads
//! them, and start-up stops naming the entry.

use internvl_core::error::EngineError;

/// The environment variable ggml reads its Vulkan device indices from.
const GGML_KEY: &str = "GGML_VK_VISIBLE_DEVICES";

/// One entry of Vulkan's device list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VulkanDevice {
    /// Its index in Vulkan's list: what `vulkan_devices` takes.
    pub index: u32,
    /// The name the driver gives it.
    pub name: String,
    /// `discrete`, `integrated`, `virtual`, `cpu` or `other`.
    pub kind: &'static str,
}

/// Makes `chosen` (the `vulkan_devices` setting; empty: the deployment's own
/// `GGML_VK_VISIBLE_DEVICES`, else ggml's default) what ggml will use, after
/// checking each index against Vulkan's list. Call before ggml starts its
/// backends; no other thread may read the environment meanwhile.
pub(super) fn choose(chosen: &[u32]) -> Result<(), EngineError> {
    if !chosen.is_empty() {
        let listed = list().map_err(|why| EngineError::offload("vulkan_devices", why))?;
        check("vulkan_devices", chosen, &listed)?;
        let joined: Vec<String> = chosen.iter().map(u32::to_string).collect();
        std::env::set_var(GGML_KEY, joined.join(","));
        return Ok(());
    }
    let Some(value) = std::env::var_os(GGML_KEY) else {
        return Ok(());
    };
    // A fleet may set the variable on every replica: where this build or
    // host has no Vulkan, ggml never reads it, and neither does this.
    let Ok(listed) = list() else {
        return Ok(());
    };
    check(GGML_KEY, &parse_env(&value.to_string_lossy())?, &listed)
}

/// ggml's reading of the variable: numbers separated by commas or spaces.
fn parse_env(value: &str) -> Result<Vec<u32>, EngineError> {
    value
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                EngineError::offload(GGML_KEY, format!("\"{s}\" is not a Vulkan device index"))
            })
        })
        .collect()
}

/// Each of `indices` names an entry of `listed`.
fn check(setting: &str, indices: &[u32], listed: &[VulkanDevice]) -> Result<(), EngineError> {
    let Some((i, &index)) = indices
        .iter()
        .enumerate()
        .find(|(_, &index)| !listed.iter().any(|d| d.index == index))
    else {
        return Ok(());
    };
    let there = if listed.is_empty() {
        "Vulkan lists no device".to_string()
    } else {
        let names: Vec<String> = listed
            .iter()
            .map(|d| format!("{}: {} ({})", d.index, d.name, d.kind))
            .collect();
        format!("Vulkan lists {}", names.join(", "))
    };
    let key = if setting == GGML_KEY {
        setting.to_string()
    } else {
        format!("{setting}[{i}]")
    };
    Err(EngineError::offload(
        key,
        format!("no Vulkan device {index}; {there}"),
    ))
}

/// Vulkan's device list, in the order ggml numbers it (both ask the same
/// loader).
#[cfg(any(feature = "vulkan", feature = "dynamic-backends"))]
pub fn list() -> Result<Vec<VulkanDevice>, String> {
    use ash::vk;
    // SAFETY: loads the system's Vulkan loader; nothing else in this process
    // unloads it, and `entry` outlives every call made through it below.
    let entry = unsafe { ash::Entry::load() }
        .map_err(|e| format!("no Vulkan loader (libvulkan.so.1): {e}"))?;
    let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_2);
    let create = vk::InstanceCreateInfo::default().application_info(&app);
    // SAFETY: `create` and `app` are valid for the call; no layers or
    // extensions are asked for.
    let instance = unsafe { entry.create_instance(&create, None) }
        .map_err(|e| format!("Vulkan instance: {e}"))?;
    // SAFETY: `instance` is live until destroyed at the end of this function.
    let physical = unsafe { instance.enumerate_physical_devices() };
    let devices = physical.map(|physical| {
        physical
            .into_iter()
            .enumerate()
            .map(|(index, device)| {
                // SAFETY: `device` came from this live instance.
                let props = unsafe { instance.get_physical_device_properties(device) };
                VulkanDevice {
                    index: index as u32,
                    name: props
                        .device_name_as_c_str()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    kind: match props.device_type {
                        vk::PhysicalDeviceType::DISCRETE_GPU => "discrete",
                        vk::PhysicalDeviceType::INTEGRATED_GPU => "integrated",
                        vk::PhysicalDeviceType::VIRTUAL_GPU => "virtual",
                        vk::PhysicalDeviceType::CPU => "cpu",
                        _ => "other",
                    },
                }
            })
            .collect()
    });
    // SAFETY: nothing made from `instance` outlives it; it is destroyed once.
    unsafe { instance.destroy_instance(None) };
    devices.map_err(|e| format!("Vulkan devices: {e}"))
}

/// A build without Vulkan has no device to choose.
#[cfg(not(any(feature = "vulkan", feature = "dynamic-backends")))]
pub fn list() -> Result<Vec<VulkanDevice>, String> {
    Err("this build has no Vulkan backend (build with --features vulkan)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lavapipe() -> Vec<VulkanDevice> {
        vec![VulkanDevice {
            index: 0,
            name: "llvmpipe (LLVM 15.0.6, 256 bits)".into(),
            kind: "cpu",
        }]
    }

    #[test]
    fn an_index_past_the_list_names_the_entry_and_what_there_is() {
        let e = check("vulkan_devices", &[0, 1], &lavapipe()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vulkan_devices[1]: no Vulkan device 1; Vulkan lists 0: llvmpipe (LLVM 15.0.6, 256 bits) (cpu)"
        );
        assert!(check("vulkan_devices", &[0], &lavapipe()).is_ok());
        let e = check(GGML_KEY, &[0], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GGML_VK_VISIBLE_DEVICES: no Vulkan device 0; Vulkan lists no device"
        );
    }

    #[test]
    fn the_variable_is_read_as_ggml_reads_it() {
        assert_eq!(parse_env("0, 2 1").unwrap(), [0, 2, 1]);
        assert_eq!(parse_env("").unwrap(), Vec::<u32>::new());
        let e = parse_env("0,gpu").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("GGML_VK_VISIBLE_DEVICES: \"gpu\""),
            "{e}"
        );
    }
}
