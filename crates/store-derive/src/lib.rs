//! `#[derive(FromSqliteRow)]`: decodes a row of herald-store's SQLite writer connection
//! (rusqlite) into a struct by column name. It reads the `#[sqlx(...)]` field attributes that
//! `sqlx::FromRow` reads (`rename`, `try_from`, `flatten`, `skip`), so a row type names its
//! columns once for both drivers and the two decodings cannot drift apart.
//!
//! The generated impl names `crate::backend::sqlite::FromSqliteRow` and
//! `crate::backend::sqlite::converted`: it is meant for herald-store alone.

use proc_macro::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Fields, LitStr, Type, parse_macro_input};

#[proc_macro_derive(FromSqliteRow, attributes(sqlx))]
pub fn derive_from_sqlite_row(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// How one field is read, from its `#[sqlx(...)]` attributes.
enum Read {
    /// The column of this name, decoded as the field's type.
    Column(String),
    /// The column of this name decoded as the given type, then converted with `TryFrom`.
    Converted(String, Box<Type>),
    /// The field's own row type, read from the same row.
    Flatten,
    /// Not a column: the field's default.
    Skip,
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            input,
            "FromSqliteRow decodes a row into a struct; this is not one",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(
            input,
            "FromSqliteRow reads columns by the names of the struct's fields; give them names",
        ));
    };
    // sqlx's struct attributes (`rename_all`, `default`, ...) would change its decoding and not
    // this one: refused until taught, like unknown field attributes.
    if let Some(attr) = input.attrs.iter().find(|a| a.path().is_ident("sqlx")) {
        return Err(syn::Error::new_spanned(
            attr,
            "FromSqliteRow reads no struct-level sqlx attribute; teach it this one before using it",
        ));
    }
    let mut inits = Vec::with_capacity(fields.named.len());
    for field in &fields.named {
        let ident = field.ident.as_ref().expect("named fields have names");
        let ty = &field.ty;
        let init = match read_of(field)? {
            Read::Column(column) => quote!(row.get::<_, #ty>(#column)?),
            Read::Converted(column, source) => {
                quote!(crate::backend::sqlite::converted::<#source, #ty>(row, #column)?)
            }
            Read::Flatten => {
                quote!(<#ty as crate::backend::sqlite::FromSqliteRow>::from_sqlite_row(row)?)
            }
            Read::Skip => quote!(::std::default::Default::default()),
        };
        inits.push(quote!(#ident: #init));
    }
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics crate::backend::sqlite::FromSqliteRow for #name #ty_generics #where_clause {
            fn from_sqlite_row(row: &::rusqlite::Row<'_>) -> ::rusqlite::Result<Self> {
                Ok(Self { #(#inits),* })
            }
        }
    })
}

fn read_of(field: &syn::Field) -> syn::Result<Read> {
    let ident = field.ident.as_ref().expect("named fields have names");
    let mut column = ident.to_string();
    let mut source = None;
    let (mut flatten, mut skip) = (false, false);
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("sqlx")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                column = meta.value()?.parse::<LitStr>()?.value();
            } else if meta.path.is_ident("try_from") {
                source = Some(Box::new(meta.value()?.parse::<LitStr>()?.parse::<Type>()?));
            } else if meta.path.is_ident("flatten") {
                flatten = true;
            } else if meta.path.is_ident("skip") {
                skip = true;
            } else {
                return Err(meta.error(
                    "FromSqliteRow reads only sqlx's rename, try_from, flatten and skip; \
                     teach it this one before using it",
                ));
            }
            Ok(())
        })?;
    }
    Ok(match (skip, flatten, source) {
        (true, _, _) => Read::Skip,
        (false, true, _) => Read::Flatten,
        (false, false, Some(source)) => Read::Converted(column, source),
        (false, false, None) => Read::Column(column),
    })
}
