//! Label values from a fixed set: an enum whose variants are the values, so a metric
//! cannot be given a string nobody pre-created, and `ALL` lists every series to create
//! at 0 (dashboards then show 0 instead of "no data").

/// Declares a `Copy` enum with `ALL` (every variant, in order) and `as_str` (the label
/// value). Attributes and doc comments on the enum and its variants are kept.
///
/// ```text
/// label_enum! {
///     /// Why a record was lost.
///     pub enum Lost {
///         /// The outbox budget is used up.
///         OutboxFull => "outbox_full",
///     }
/// }
/// ```
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$(stringify!($variant)),+].len()] = [$($name::$variant),+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $label ),+
                }
            }
        }
    };
}

pub(crate) use label_enum;

#[cfg(test)]
mod tests {
    label_enum! {
        /// A test enum.
        enum Colour {
            /// The first.
            Red => "red",
            DarkBlue => "dark_blue",
        }
    }

    #[test]
    fn all_lists_every_variant_in_order_with_its_label() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkBlue]);
        let labels: Vec<_> = Colour::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels, ["red", "dark_blue"]);
    }
}
